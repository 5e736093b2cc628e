"""Patient-level, label-stratified train/validation/test splits."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medtl.errors import MedtlInputError


def split_by_patient(
    labels: Sequence[int], patients: Sequence[str], val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, np.ndarray]:
    """Split image indices into ``train``/``val``/``test`` so that no patient is in two parts.

    Uses scikit-learn's ``StratifiedGroupKFold`` twice (test off the whole set, then validation
    off the rest), so class proportions are kept as far as patient grouping allows. Multi-label
    ``labels`` (a row of 0/1 per image) are stratified over their combinations (:func:`strata`).

    Raises:
        MedtlInputError: a part would lack a class (too few patients of that class); multi-label, a part
            would lack the positives or the negatives of a finding.
    """
    labels, patients = np.asarray(labels), np.asarray(patients)
    if len(labels) != len(patients):
        raise MedtlInputError(None, f"{len(labels)} labels but {len(patients)} patient ids")
    idx = np.arange(len(labels))
    key = strata(labels)
    test_rel, rest = _one_fold(idx, key, patients, test_fraction, seed)
    val_rel, train_rel = _one_fold(rest, key[rest], patients[rest], val_fraction / (1 - test_fraction), seed + 1)
    parts = {"train": np.sort(train_rel), "val": np.sort(val_rel), "test": np.sort(test_rel)}
    if labels.ndim == 2:
        _check_findings(labels, parts, 1, patients)
        return parts
    classes = np.unique(labels)
    for name, part in parts.items():
        missing = sorted(set(classes.tolist()) - set(labels[part].tolist()))
        if missing:
            per_class = {int(c): len(set(patients[labels == c])) for c in classes}
            raise MedtlInputError(
                None,
                f"the {name} split has no example of class index {missing}; patients per class: {per_class}",
                "at least 3 patients of every class (more for a meaningful test)",
            )
    return parts


def strata(labels: np.ndarray, min_count: int = 5) -> np.ndarray:
    """What a split stratifies on: the class index, or for multi-label rows their combination of findings
    (a combination seen fewer than ``min_count`` times joins the stratum of its rarest finding, so that
    rare findings are still spread over the parts)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    combos, key, counts = np.unique(labels, axis=0, return_inverse=True, return_counts=True)
    key = key.reshape(-1).copy()
    prevalence = labels.sum(axis=0)
    for c, combo in enumerate(combos):
        if counts[c] < min_count and combo.any():
            rarest = int(np.argmin(np.where(combo > 0, prevalence, np.inf)))
            key[key == c] = len(combos) + rarest
    return key


def _check_findings(labels: np.ndarray, parts: dict[str, np.ndarray], minimum: int, patients=None) -> None:
    """Refuse parts in which a finding has fewer than ``minimum`` positive or negative examples."""
    for name, idx in parts.items():
        pos = labels[idx].sum(axis=0)
        neg = len(idx) - pos
        low = [i for i in range(labels.shape[1]) if pos[i] < minimum or neg[i] < minimum]
        if low:
            raise MedtlInputError(
                None,
                f"the {name} split has fewer than {minimum} positive or negative examples of finding index(es) "
                f"{low} (positives {pos.tolist()} of {len(idx)})",
                f"at least {minimum} images with and without every finding in every split (more patients with the "
                "rare findings, or leave those findings out with data.classes)",
            )


def _one_fold(idx, labels, patients, fraction, seed):
    n_splits = max(2, round(1.0 / fraction))
    n_patients = len(set(patients.tolist()))
    if n_patients < n_splits:
        raise MedtlInputError(
            None, f"only {n_patients} patients: too few for a {fraction:.0%} hold-out", f"at least {n_splits} patients"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # multi-label strata rarer than the folds: spread as far as they go
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        rest_rel, held_rel = next(sgkf.split(idx, labels, groups=patients))
    return idx[held_rel], idx[rest_rel]


def kfold_by_patient(
    labels: Sequence[int], patients: Sequence[str], k: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train+val, test) index pairs; every patient is tested exactly once, in one fold.

    Raises:
        MedtlInputError: fewer patients of a class than folds.
    """
    labels, patients = np.asarray(labels), np.asarray(patients)
    if labels.ndim == 2:
        for i in range(labels.shape[1]):
            n = len(set(patients[labels[:, i] > 0].tolist()))
            if n < k:
                raise MedtlInputError(
                    None,
                    f"finding index {i} has {n} patients: too few for {k} folds",
                    f"at least {k} patients with every finding, or fewer folds",
                )
    key = strata(labels)
    for c in np.unique(labels) if labels.ndim == 1 else ():
        n = len(set(patients[labels == c].tolist()))
        if n < k:
            raise MedtlInputError(
                None,
                f"class index {int(c)} has {n} patients: too few for {k} folds",
                f"at least {k} patients per class, or fewer folds",
            )
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # multi-label strata rarer than k: spread as far as they go
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return [(np.sort(a), np.sort(b)) for a, b in sgkf.split(np.arange(len(labels)), key, groups=patients)]


def check_split_classes(labels: Sequence[int], parts: dict[str, np.ndarray], n_classes: int, minimum: int = 2) -> None:
    """Refuse, before training, a split in which a class has fewer than ``minimum`` examples (multi-label:
    fewer than ``minimum`` images with, or without, a finding)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return _check_findings(labels, parts, minimum)
    for name, idx in parts.items():
        counts = np.bincount(labels[idx], minlength=n_classes)
        low = {int(c): int(counts[c]) for c in range(n_classes) if counts[c] < minimum}
        if low:
            raise MedtlInputError(
                None,
                f"the {name} split has fewer than {minimum} examples of class index(es) "
                f"{low} (counts {counts.tolist()})",
                f"at least {minimum} per class in every split",
            )


class TooFewExamplesError(MedtlInputError):
    """A class has fewer examples than a study asks for."""


def sample_per_class(
    labels: Sequence[int], n_per_class: int | None, seed: int, class_names: Sequence[str] | None = None
) -> list[int]:
    """Indices of ``n_per_class`` examples of every class (all of them when None), drawn with ``seed``.

    A class with fewer than ``n_per_class`` examples raises :class:`TooFewExamplesError` with
    every class's count; the sample is never silently shrunk.
    """
    labels = np.asarray(labels)
    if n_per_class is None:
        return list(range(len(labels)))
    if labels.ndim == 2:
        raise MedtlInputError(
            None,
            "sampling a number of examples per class is for single-label data",
            "n_per_class None (all examples) for a multi-label data set",
        )
    classes, counts = np.unique(labels, return_counts=True)
    if (counts < n_per_class).any():
        names = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
        have = ", ".join(f"class {n}: {k}" for n, k in zip(names, counts))
        raise TooFewExamplesError(
            None,
            f"{n_per_class} examples per class asked for, the data has {have}",
            f"at most {counts.min()} per class",
        )
    rng = np.random.default_rng(seed)
    picked = [i for c in classes for i in rng.choice(np.where(labels == c)[0], size=n_per_class, replace=False)]
    return sorted(int(i) for i in picked)
