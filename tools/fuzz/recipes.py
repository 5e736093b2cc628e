"""Recipes: mutant ``index`` of run seed ``run_seed`` is a seed file and a mutator drawn from
``random.Random("plan:<run_seed>:<index>")``; the mutator's edits come from its own stream, so a recipe
regenerates its mutant byte for byte."""

import random

from tools.fuzz.mutators import MUTATORS
from tools.fuzz.mutators.generic import BYTE_MUTATORS, bitflip
from tools.fuzz.registry import plain
from tools.fuzz.seeds import KINDS, Seed

KIND_WEIGHTS = {
    "dicom": 0.36,
    "nifti": 0.17,
    "picture": 0.17,
    "zip": 0.15,
    "config": 0.05,
    "npz": 0.05,
    "manifest": 0.05,
    "folder": 0.04,
}
FORMAT_FAMILY = {"folder": "zip"}  # a folder tree is made from a zip's members: the zip mutators edit it
# "format": the kind's own family
FAMILY_WEIGHTS = (("bytes", 0.28), ("format", 0.63), ("bomb", 0.03), ("sizelie", 0.06))


def plan(run_seed: int, index: int, seeds: list[Seed]) -> dict:
    """The recipe of mutant ``index``: which seed and mutator (the mutator's edits come from its own stream)."""
    rng = random.Random(f"plan:{run_seed}:{index}")
    by_kind = {k: [s for s in seeds if s.kind == k] for k in KINDS}
    kinds = [k for k in KINDS if by_kind[k]]
    kind = rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0]
    seed = rng.choice(by_kind[kind])
    family = rng.choices([f for f, _ in FAMILY_WEIGHTS], [w for _, w in FAMILY_WEIGHTS])[0]
    family = FORMAT_FAMILY.get(kind, kind) if family == "format" else family
    options = [m for m in MUTATORS.values() if m.family == family and kind in m.kinds and m.applies(seed)]
    if not options:
        options = [MUTATORS[n] for n in BYTE_MUTATORS]
    m = rng.choice(options)
    return {"run_seed": run_seed, "index": index, "seed": seed.id, "kind": kind, "family": m.family, "mutator": m.name}


def make_mutant(recipe: dict, seeds: dict[str, Seed]) -> tuple[bytes, dict, str]:
    """Regenerate a mutant from its recipe: (bytes, details of the edits, file name)."""
    seed = seeds[recipe["seed"]]
    m = MUTATORS[recipe["mutator"]]
    rng = random.Random(f"mutate:{recipe['run_seed']}:{recipe['index']}:{m.name}:{seed.id}")
    try:
        data, details = m.fn(seed.data, rng, seed)
    except Exception as e:  # the seed lacks what the mutator edits: fall back to bit flips, recorded
        data, details = bitflip(seed.data, random.Random(f"fallback:{recipe['run_seed']}:{recipe['index']}"), seed)
        details = {"fallback": f"{type(e).__name__}: {str(e)[:120]}", **details}
    name = f"m{recipe['index']:06d}{'.zip' if seed.kind == 'zip' else seed.suffix}"
    return data, plain(details), name
