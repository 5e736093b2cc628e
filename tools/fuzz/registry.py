"""The mutator registry: each mutator registers itself with :func:`mutator`, by family and the seed kinds it
edits. A mutator is ``fn(data, rng, seed) -> (bytes, details)``: it draws its edits from ``rng`` only, so a
recipe regenerates its mutant byte for byte, and ``details`` records what it did."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAMILIES = ("bytes", "dicom", "nifti", "picture", "zip", "bomb", "sizelie", "config", "npz", "manifest")


@dataclass(frozen=True)
class Mutator:
    name: str
    family: str  # one of FAMILIES
    kinds: tuple[str, ...]  # the seed kinds it edits (tools.fuzz.seeds.KINDS)
    fn: Callable[..., tuple[bytes, dict]]  # (data, rng, seed) -> (bytes, details)
    applies: Callable[[Any], bool]  # (seed) -> whether it can edit that seed


# name -> mutator, in registration order (tools.fuzz.recipes.plan draws from it family by family)
MUTATORS: dict[str, Mutator] = {}


def _always(seed) -> bool:
    return True


def mutator(family: str, kinds: tuple[str, ...], applies: Callable[[Any], bool] | None = None):
    """Register the decorated function as a mutator of ``family`` for seeds of ``kinds``."""

    def register(fn):
        MUTATORS[fn.__name__] = Mutator(fn.__name__, family, kinds, fn, applies or _always)
        return fn

    return register


def plain(v):
    """A JSON-friendly form of a detail value (bytes and odd floats as text)."""
    if isinstance(v, bytes):
        return v[:64].decode("latin-1")
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v
