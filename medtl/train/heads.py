"""Few-shot heads fitted in closed form on the frozen encoder's features (``train.strategy`` "logreg" and
"ncm"), their weights written into the model's linear head."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV


def ncm_head(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The nearest class mean (Euclidean), which is linear in the features: logit_c = f·m_c - |m_c|^2 / 2;
    (weight, bias, what was fitted)."""
    means = np.stack([x[y == c].mean(0) if (y == c).any() else np.zeros(x.shape[1]) for c in range(num_classes)])
    return means, -0.5 * (means**2).sum(1), "class means"


def logreg_head(
    x: np.ndarray, y: np.ndarray, num_classes: int, balanced: bool = True
) -> tuple[np.ndarray, np.ndarray, str]:
    """An L2-regularised logistic regression whose strength is chosen by stratified cross-validation on the
    training features (log loss; class-balanced with ``balanced``); (weight, bias, what was chosen)."""
    folds = int(max(2, min(5, np.bincount(y, minlength=num_classes).min())))
    # centred, and scaled by one number for all features: a per-feature standardisation would blow up
    # the features that barely vary in a few dozen images (and vary in new ones)
    mean, scale = x.mean(0), float(x.std(0).mean()) or 1.0
    clf = LogisticRegressionCV(
        Cs=np.logspace(-4, 2, 13),
        cv=folds,
        scoring="neg_log_loss",
        max_iter=2000,
        class_weight="balanced" if balanced else None,
    )
    # scikit-learn's notices of its coming defaults, and of the weakest regularisations of the grid not
    # converging (cross-validation judges those by their score like the others)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - mean) / scale, y)
    coef = clf.coef_ / scale  # the centring and scaling folded into the head
    intercept = clf.intercept_ - (coef * mean).sum(1)
    if coef.shape[0] == 1:  # binary: one decision function, split symmetrically over the two logits
        coef, intercept = np.stack([-coef[0], coef[0]]) / 2, np.array([-intercept[0], intercept[0]]) / 2
    return coef, intercept, f"C={float(clf.C_[0]):.3g} chosen by {folds}-fold cross-validation"


def fit_head(
    name: str,
    head: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    balanced: bool = True,
) -> str:
    """Fit the few-shot head ``name`` ("logreg" or "ncm") on ``features`` and write it into the linear
    ``head``; what was fitted, in words."""
    x, y = features.float().cpu().numpy(), labels.cpu().numpy()
    weight, bias, detail = ncm_head(x, y, num_classes) if name == "ncm" else logreg_head(x, y, num_classes, balanced)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return detail


__all__ = ["fit_head", "logreg_head", "ncm_head"]
