"""Patient-level, label-stratified train/validation/test splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medtl.errors import MedtlInputError


def split_by_patient(
    labels: Sequence[int], patients: Sequence[str], val_fraction: float = 0.2,
    test_fraction: float = 0.2, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split image indices into ``train``/``val``/``test`` so that no patient is in two parts.

    Uses scikit-learn's ``StratifiedGroupKFold`` twice (test off the whole set, then validation
    off the rest), so class proportions are kept as far as patient grouping allows.

    Raises:
        MedtlInputError: a part would lack a class (too few patients of that class).
    """
    labels, patients = np.asarray(labels), np.asarray(patients)
    if len(labels) != len(patients):
        raise MedtlInputError(None, f"{len(labels)} labels but {len(patients)} patient ids")
    idx = np.arange(len(labels))
    test_rel, rest = _one_fold(idx, labels, patients, test_fraction, seed)
    val_rel, train_rel = _one_fold(rest, labels[rest], patients[rest], val_fraction / (1 - test_fraction), seed + 1)
    parts = {"train": np.sort(train_rel), "val": np.sort(val_rel), "test": np.sort(test_rel)}
    classes = np.unique(labels)
    for name, part in parts.items():
        missing = sorted(set(classes.tolist()) - set(labels[part].tolist()))
        if missing:
            per_class = {int(c): len(set(patients[labels == c])) for c in classes}
            raise MedtlInputError(
                None, f"the {name} split has no example of class index {missing}; patients per class: {per_class}",
                "at least 3 patients of every class (more for a meaningful test)")
    return parts


def _one_fold(idx, labels, patients, fraction, seed):
    n_splits = max(2, int(round(1.0 / fraction)))
    n_patients = len(set(patients.tolist()))
    if n_patients < n_splits:
        raise MedtlInputError(None, f"only {n_patients} patients: too few for a {fraction:.0%} hold-out",
                              f"at least {n_splits} patients")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest_rel, held_rel = next(sgkf.split(idx, labels, groups=patients))
    return idx[held_rel], idx[rest_rel]


def kfold_by_patient(labels: Sequence[int], patients: Sequence[str], k: int = 5,
                     seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train+val, test) index pairs; every patient is tested exactly once, in one fold.

    Raises:
        MedtlInputError: fewer patients of a class than folds.
    """
    labels, patients = np.asarray(labels), np.asarray(patients)
    for c in np.unique(labels):
        n = len(set(patients[labels == c].tolist()))
        if n < k:
            raise MedtlInputError(None, f"class index {int(c)} has {n} patients: too few for {k} folds",
                                  f"at least {k} patients per class, or fewer folds")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in sgkf.split(np.arange(len(labels)), labels, groups=patients)]


def check_split_classes(labels: Sequence[int], parts: dict[str, np.ndarray], n_classes: int,
                        minimum: int = 2) -> None:
    """Refuse, before training, a split in which a class has fewer than ``minimum`` examples."""
    labels = np.asarray(labels)
    for name, idx in parts.items():
        counts = np.bincount(labels[idx], minlength=n_classes)
        low = {int(c): int(counts[c]) for c in range(n_classes) if counts[c] < minimum}
        if low:
            raise MedtlInputError(None, f"the {name} split has fewer than {minimum} examples of class index(es) "
                                  f"{low} (counts {counts.tolist()})", f"at least {minimum} per class in every split")


class TooFewExamplesError(MedtlInputError):
    """A class has fewer examples than a study asks for."""


def sample_per_class(labels: Sequence[int], n_per_class: int | None, seed: int,
                     class_names: Sequence[str] | None = None) -> list[int]:
    """Indices of ``n_per_class`` examples of every class (all of them when None), drawn with ``seed``.

    A class with fewer than ``n_per_class`` examples raises :class:`TooFewExamplesError` with
    every class's count; the sample is never silently shrunk.
    """
    labels = np.asarray(labels)
    if n_per_class is None:
        return list(range(len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    if (counts < n_per_class).any():
        names = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
        have = ", ".join(f"class {n}: {k}" for n, k in zip(names, counts))
        raise TooFewExamplesError(None, f"{n_per_class} examples per class asked for, the data has {have}",
                                  f"at most {counts.min()} per class")
    rng = np.random.default_rng(seed)
    picked = [i for c in classes for i in rng.choice(np.where(labels == c)[0], size=n_per_class, replace=False)]
    return sorted(int(i) for i in picked)
