"""Classification metrics computed with scikit-learn (pure functions, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from medtl.errors import MedtlInputError


def compute_auc(labels: Sequence[int], probs: np.ndarray) -> float | None:
    """ROC AUC: of class 1 for binary tasks, one-vs-rest macro for more classes.

    Returns None when ``labels`` hold a single class (AUC is undefined).
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    _check(labels, probs)
    if len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        return None
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def compute_classification_metrics(labels: Sequence[int], probs: np.ndarray) -> dict:
    """AUC, accuracy, and for binary tasks sensitivity/specificity of class 1 at argmax.

    Args:
        labels: true class index of each image.
        probs: (n_images, n_classes) predicted probabilities.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    _check(labels, probs)
    pred = probs.argmax(axis=1)
    out = {
        "n_images": int(len(labels)),
        "auc": compute_auc(labels, probs),
        "accuracy": float(accuracy_score(labels, pred)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(probs.shape[1]))).tolist(),
    }
    if probs.shape[1] == 2:
        tn, fp, fn, tp = np.asarray(out["confusion_matrix"]).ravel()
        out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else None
        out["specificity"] = float(tn / (tn + fp)) if tn + fp else None
        out["operating_point"] = "argmax (class-1 probability >= 0.5)"
    return out


def _check(labels: np.ndarray, probs: np.ndarray) -> None:
    if probs.ndim != 2 or len(labels) != len(probs):
        raise MedtlInputError(None, f"{len(labels)} labels but scores of shape {probs.shape}",
                              "one row of class probabilities per label")
    if not np.all(np.isfinite(probs)):
        raise MedtlInputError(None, "scores contain NaN or infinity")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise MedtlInputError(None, f"labels outside 0..{probs.shape[1] - 1}")
