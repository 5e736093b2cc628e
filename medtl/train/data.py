"""The data of a training run: the data set read, every image decoded once, split by patient."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtl.config import DataConfig
from medtl.data import (
    Manifest,
    Problem,
    check_split_classes,
    create_dataset,
    decode_records,
    read_dataset,
    read_unlabelled,
    split_by_patient,
)
from medtl.data.dataset import decode_workers, store_options
from medtl.data.manifest import positive_class
from medtl.errors import ConfigError, MedtlInputError
from medtl.models import Preprocessing
from medtl.transforms.chain import create_transforms

log = logging.getLogger("medtl.train")


@dataclass
class PreparedData:
    """A data set decoded once and split: what :func:`fit` and the evaluation need."""

    manifest: Manifest
    sets: dict[str, list[dict]]  # "train"/"val"/"test" -> decoded studies
    problems: list[Problem]  # rows and files that were skipped
    split_source: str  # "fixed (from the file)" or "patient-level stratified, seed N"

    def datasets(self, data: DataConfig, pre: Preprocessing, train_subset: list[int] | None = None):
        """(train, val, test) MONAI datasets; ``train_subset`` picks training studies by index."""
        train = self.sets["train"] if train_subset is None else [self.sets["train"][i] for i in train_subset]
        return (
            *create_datasets(data, pre, train, train=True),
            *create_datasets(data, pre, self.sets["val"], self.sets["test"]),
        )


def read_data(data: DataConfig) -> Manifest:
    """The data set named by ``data.path`` (a manifest .csv, an image folder or a MedMNIST .npz)."""
    if not data.path:
        raise ConfigError(None, "no data given", "data.path (CLI: --data PATH: a manifest .csv, image folder or .npz)")
    return read_dataset(
        data.path, classes=data.classes, allow_outside_paths=data.allow_outside_paths, label_columns=data.label_columns
    )


def prepare_data(
    data: DataConfig, pre: Preprocessing, seed: int = 0, manifest: Manifest | None = None, workers: int | str = "auto"
) -> PreparedData:
    """Read the data set of ``data.path``, decode every image once and split it by patient.

    A MedMNIST file keeps its own split; other data sets get a patient-level, label-stratified
    split. Every class must have at least 2 examples in every split (refused otherwise). The files are
    read by ``workers`` processes (``train.workers``; see :func:`medtl.data.dataset.decode_workers`).
    """
    manifest = manifest or read_data(data)
    positive_class(data, manifest)  # (a data.positive_class naming no class is refused before any decoding)
    deterministic, _ = create_transforms(data, pre, train=False)
    log.info("%r; decoding images", manifest)
    samples, problems = decode_records(
        manifest.records, deterministic, cache_folder(data, pre), decode_workers(workers, len(manifest.records))
    )
    problems = manifest.problems + problems
    if not samples:
        raise MedtlInputError(manifest.path, "no image in the data set could be read")
    labels = [s["label"] for s in samples]
    if manifest.splits:
        kept = {s["path"]: i for i, s in enumerate(samples)}
        parts = {
            name: np.asarray([kept[manifest.records[i]["path"]] for i in idx if manifest.records[i]["path"] in kept])
            for name, idx in manifest.splits.items()
        }
        how = "fixed (from the file)"
    else:
        parts = split_by_patient(
            labels, [s["patient_id"] for s in samples], data.val_fraction, data.test_fraction, seed
        )
        how = f"patient-level stratified, seed {seed}"
    check_split_classes(labels, parts, len(manifest.class_names))
    sets = {name: [samples[i] for i in idx] for name, idx in parts.items()}
    return PreparedData(manifest, sets, problems, how)


def prepare_unlabelled(data: DataConfig, pre: Preprocessing, prepared: PreparedData, workers: int | str = "auto"):
    """The data set of ``data.unlabelled`` (None without it): read and decoded like the labelled images, less
    any image that is also in the validation or test split (it would leak into training)."""
    if not data.unlabelled:
        return None
    records = read_unlabelled(data.unlabelled, data.allow_outside_paths)
    held = {str(s.get("path", "")) for name in ("val", "test") for s in prepared.sets[name]}
    kept = [r for r in records if str(r.get("path", r["image"])) not in held]
    if len(kept) < len(records):
        log.warning("data.unlabelled: %d image(s) of the validation or test split left out", len(records) - len(kept))
    deterministic, final = create_transforms(data, pre, train=False)
    samples, problems = decode_records(kept, deterministic, cache_folder(data, pre), decode_workers(workers, len(kept)))
    prepared.problems.extend(problems)
    log.info("data.unlabelled: %d images for semi-supervised training (%d unreadable)", len(samples), len(problems))
    return create_dataset(samples, final, (data.slice_aggregation, data.top_k), **store_options(data))


def cache_folder(data: DataConfig, pre: Preprocessing) -> str | None:
    """``data.cache_dir``/<hash of every setting that shapes a decoded input>: runs with other intensity,
    colour, volume or size settings never read each other's cached inputs."""
    if not data.cache_dir:
        return None
    shaping = {
        k: v
        for k, v in dataclasses.asdict(data).items()
        if k
        not in (
            "path",
            "cache_dir",
            "val_fraction",
            "test_fraction",
            "augment",
            "flip",
            "color_jitter",
            "classes",
            "allow_outside_paths",
            "slice_aggregation",
            "top_k",
            "input_store",
        )
    }
    key = json.dumps(
        {
            "data": shaping,
            "input_size": pre.input_size,
            "in_chans": pre.in_chans,
            "spatial_dims": pre.spatial_dims,
            "medtl": CACHE_FORMAT,
        },
        sort_keys=True,
        default=str,
    )
    return str(Path(data.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16])


CACHE_FORMAT = 3  # bump when the decoded samples' content changes


def create_datasets(data: DataConfig, pre: Preprocessing, *parts: list[dict], train: bool = False) -> list:
    """A data set of each list of decoded studies, read as training reads them (``train``: with its batch
    augmentation) or as evaluation and prediction do."""
    _, final = create_transforms(data, pre, train=train)
    agg, store = (data.slice_aggregation, data.top_k), store_options(data)
    return [create_dataset(part, final, agg, **store) for part in parts]


__all__ = [
    "PreparedData",
    "read_data",
    "prepare_data",
    "prepare_unlabelled",
    "cache_folder",
    "create_datasets",
    "CACHE_FORMAT",
]
