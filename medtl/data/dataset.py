"""Datasets over manifest records: decoded once, augmented on the fly."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from monai.data import Dataset
from monai.transforms import Compose

from medtl.data.manifest import Problem
from medtl.errors import find_input_error

log = logging.getLogger("medtl.data")


def decode_records(records: Sequence[dict], deterministic: Compose) -> tuple[list[dict], list[Problem]]:
    """Apply the deterministic (read + resize) chain once to every record.

    A file that cannot be read is reported (logged, returned as a :class:`Problem`) and skipped;
    the others are kept in memory so no scan is decoded twice.
    """
    samples, problems = [], []
    for rec in records:
        try:
            samples.append(deterministic(rec))
        except Exception as e:  # MONAI wraps transform errors; find ours underneath
            cause = find_input_error(e)
            if cause is None:
                raise
            problems.append(Problem(str(rec["image"]), f"{type(cause).__name__}: {cause.problem}"))
            log.warning("skipped %s", problems[-1])
    return samples, problems


def create_dataset(samples: list[dict], final: Compose) -> Dataset:
    """A MONAI dataset over decoded samples that applies ``final`` (augmentation, normalisation)."""
    keep = ("image", "label")
    return Dataset([{k: s[k] for k in keep if k in s} for s in samples], transform=final)
