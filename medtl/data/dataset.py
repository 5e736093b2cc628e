"""Datasets over data-set records: decoded once (in memory, or on disk with MONAI's
``PersistentDataset``), augmented on the fly."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, Randomizable

from medtl.data.manifest import Problem
from medtl.errors import find_input_error
from medtl.transforms import split_slices

log = logging.getLogger("medtl.data")

KEEP = ("image", "label", "patient_id", "path", "original_shape", "slice_index", "n_inputs", "study_id", "site",
        "modality", "scan_ndim", "scan_modality", "scan_colour", "scan_min_side")


def decode_records(records: Sequence[dict], deterministic: Compose,
                   cache_dir: str | None = None) -> tuple[list[dict], list[Problem]]:
    """Apply the deterministic (read + scale + shrink) chain once to every record.

    With ``cache_dir``, results are also stored on disk by MONAI's ``PersistentDataset`` (keyed
    by a hash of the record and reused by later runs). A file that cannot be read is reported
    (logged, returned as a :class:`Problem`) and skipped; the others are kept.
    """
    source = PersistentDataset(list(records), deterministic, cache_dir=cache_dir) if cache_dir else None
    samples, problems = [], []
    for i, rec in enumerate(records):
        try:
            out = source[i] if source is not None else deterministic(rec)
        except Exception as e:  # MONAI wraps transform errors; find ours underneath
            cause = find_input_error(e)
            if cause is None:
                raise
            where = str(rec.get("path") or rec["image"])
            problems.append(Problem(where, f"{type(cause).__name__}: {cause.problem}"))
            log.warning("skipped %s", problems[-1])
            continue
        samples.append({k: out[k] for k in KEEP if k in out})
    return samples, problems


def expand_inputs(studies: Sequence[dict]) -> list[dict]:
    """One sample per model input; each keeps ``study`` (its index in ``studies``) for aggregation."""
    out = []
    for i, s in enumerate(studies):
        for part in split_slices(s):
            part["study"] = i
            out.append(part)
    return out


MEMORY_CACHE_BYTES = 1 << 30  # a data set's final model inputs are kept in memory when they fit in this


class InputDataset(Dataset):
    """Model inputs of studies (MONAI ``Dataset``), and how a study's score is made from its inputs'."""

    def __init__(self, data: Sequence[dict], transform: Compose, aggregation: tuple[str, int] = ("mean", 3)):
        super().__init__(data, transform)
        self.aggregation = aggregation  # (rule, k): "mean", "max" or "topk" over a study's slice scores


class CachedInputDataset(CacheDataset):
    """:class:`InputDataset` whose inputs are kept in memory after their first use (MONAI runtime cache)."""

    def __init__(self, data: Sequence[dict], transform: Compose, aggregation: tuple[str, int] = ("mean", 3)):
        super().__init__(data, transform, progress=False, copy_cache=False, runtime_cache=True)
        self.aggregation = aggregation  # (rule, k): "mean", "max" or "topk" over a study's slice scores


def create_dataset(studies: Sequence[dict], final: Compose, aggregation: tuple[str, int] = ("mean", 3),
                   memory_cache_bytes: int = MEMORY_CACHE_BYTES) -> InputDataset | CachedInputDataset:
    """The model inputs of ``studies`` (slices of volumes in the "slices" modes) applying ``final``.

    ``aggregation`` (rule, k) tells evaluation how slice scores make a study score. ``final`` is
    deterministic (training augmentation runs on whole batches, see
    :class:`medtl.transforms.BatchAugment`), so when all inputs fit in ``memory_cache_bytes`` each
    one is computed once, at its first use, and kept: epochs after the first spend no time on
    per-sample transforms.
    """
    keep = ("image", "label", "study", "slice_index")
    items = [{k: s[k] for k in keep if k in s} for s in expand_inputs(studies)]
    ds = InputDataset(items, final, aggregation)
    if items and isinstance(final, Compose) and final.get_index_of_first(lambda t: isinstance(t, Randomizable)) \
            is None and len(items) * _nbytes(ds[0]["image"]) <= memory_cache_bytes:
        return CachedInputDataset(items, final, aggregation)
    return ds


def _nbytes(x) -> int:
    return int(x.element_size() * x.nelement()) if hasattr(x, "element_size") else int(np.asarray(x).nbytes)


def study_index(dataset: Dataset) -> np.ndarray:
    """The study each sample of a :func:`create_dataset` dataset belongs to."""
    return np.asarray([s.get("study", i) for i, s in enumerate(dataset.data)])
