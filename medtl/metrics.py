"""Classification metrics computed with scikit-learn (pure functions, no I/O).

Confidence intervals come from a bootstrap that resamples patients (or studies), not images,
so that several images of one patient do not make an interval look narrower than it is.
Operating points are chosen on validation data and then applied to the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from medtl.errors import MedtlInputError


def compute_auc(labels: npt.ArrayLike, probs: np.ndarray, strict: bool = False) -> float | None:
    """ROC AUC: of class 1 for binary tasks, one-vs-rest macro for more classes.

    Returns None when ``labels`` hold a single class (AUC is undefined); with ``strict`` that
    is an error saying so. Multi-label ``labels`` (a row of 0/1 per image): the macro mean of the findings'
    AUCs, over the findings that have positive and negative examples (None when none has).
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.ndim == 2:
        aucs = [a for a in compute_label_aucs(labels, probs) if a is not None]
        if not aucs and strict:
            raise MedtlInputError(
                None,
                "AUC is undefined: no finding has both positive and negative examples",
                "images with and without the findings",
            )
        return float(np.mean(aucs)) if aucs else None
    _check(labels, probs)
    if len(np.unique(labels)) < 2:
        if strict:
            raise MedtlInputError(
                None,
                f"AUC is undefined: all {len(labels)} labels are class {int(labels[0]) if len(labels) else '-'}",
                "labels of at least two classes",
            )
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        return None
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def compute_label_aucs(labels: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """Multi-label: each finding's ROC AUC (None for a finding whose images are all positive or all negative)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    _check_multi_label(labels, probs)
    return [
        float(roc_auc_score(labels[:, k], probs[:, k])) if len(np.unique(labels[:, k])) == 2 else None
        for k in range(labels.shape[1])
    ]


def _check_multi_label(labels: np.ndarray, probs: np.ndarray) -> None:
    if labels.shape != probs.shape:
        raise MedtlInputError(
            None,
            f"multi-label labels of shape {labels.shape} but scores of shape {probs.shape}",
            "one score per finding and image",
        )
    if not np.all(np.isfinite(probs)):
        raise MedtlInputError(None, "scores contain NaN or infinity")
    if not np.isin(labels, (0, 1)).all():
        raise MedtlInputError(None, "multi-label labels other than 0 and 1")


def compute_multilabel_metrics(
    labels: np.ndarray, probs: np.ndarray, names: Sequence[str], thresholds: Sequence[float] | None = None
) -> dict:
    """Multi-label metrics: macro AUC, and per finding its AUC, prevalence, and the sensitivity, specificity,
    PPV and F1 at its threshold (``thresholds``, chosen on validation; 0.5 when None), with the Brier score
    and expected calibration error of its probabilities.

    Args:
        labels: (n_images, n_findings) 0/1.
        probs: (n_images, n_findings) predicted probabilities (a sigmoid per finding).
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    aucs = compute_label_aucs(labels, probs)
    thresholds = [0.5] * labels.shape[1] if thresholds is None else list(thresholds)
    per = {}
    for k, name in enumerate(names):
        at = compute_binary_metrics(labels[:, k], probs[:, k], thresholds[k])
        two = np.stack([1 - probs[:, k], probs[:, k]], axis=1)
        per[name] = {
            "auc": aucs[k],
            "n_positive": int(labels[:, k].sum()),
            "prevalence": float(labels[:, k].mean()),
            **{m: at[m] for m in ("threshold", "sensitivity", "specificity", "ppv", "f1")},
            "brier": float(np.mean((probs[:, k] - labels[:, k]) ** 2)),
            "ece": compute_ece(labels[:, k], two),
        }
    defined = [a for a in aucs if a is not None]
    pred = (probs >= np.asarray(thresholds)[None, :]).astype(int)
    return {
        "n_images": len(labels),
        "auc": float(np.mean(defined)) if defined else None,
        "auc_kind": f"macro over the {len(defined)} findings with positive and negative examples",
        "exact_match": float(np.mean((pred == labels).all(axis=1))),
        "per_label": per,
    }


def compute_classification_metrics(labels: npt.ArrayLike, probs: np.ndarray) -> dict:
    """AUC, accuracy, and for binary tasks sensitivity/specificity of class 1 at argmax.

    Args:
        labels: true class index of each image.
        probs: (n_images, n_classes) predicted probabilities.

    Multi-label ``labels`` (a row of 0/1 per image) give :func:`compute_multilabel_metrics` at 0.5.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.ndim == 2:
        return compute_multilabel_metrics(labels, probs, [str(k) for k in range(labels.shape[1])])
    _check(labels, probs)
    pred = probs.argmax(axis=1)
    out = {
        "n_images": len(labels),
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
        raise MedtlInputError(
            None, f"{len(labels)} labels but scores of shape {probs.shape}", "one row of class probabilities per label"
        )
    if not np.all(np.isfinite(probs)):
        raise MedtlInputError(None, "scores contain NaN or infinity")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise MedtlInputError(None, f"labels outside 0..{probs.shape[1] - 1}")


# -- operating points ------------------------------------------------------------------------------


def choose_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike, rule: str = "youden") -> tuple[float, str]:
    """A decision threshold on class-1 scores chosen on validation data, and its description.

    ``rule``: "youden" (max sensitivity + specificity - 1 on the kernel-smoothed ROC), "sensitivity:0.9" (the highest
    threshold reaching that sensitivity) or "specificity:0.9" (the lowest reaching that specificity).
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        raise MedtlInputError(None, "an operating point needs validation labels of both classes")
    fpr, tpr, thr = roc_curve(labels, scores)
    thr = np.minimum(thr, 1.0)
    if rule == "youden":
        t = _smoothed_youden(labels, scores)
        sens, spec = float(np.mean(scores[labels == 1] >= t)), float(np.mean(scores[labels == 0] < t))
        return t, f"Youden on the smoothed ROC; validation sensitivity {sens:.2f}, specificity {spec:.2f}"
    kind, _, value = rule.partition(":")
    try:
        target = float(value)
    except ValueError:
        raise MedtlInputError(
            None, f"unknown operating-point rule {rule!r}", "'youden', 'sensitivity:0.9' or 'specificity:0.9'"
        ) from None
    if kind == "sensitivity":
        i = int(np.argmax(tpr >= target))
    elif kind == "specificity":
        ok = np.where(1 - fpr >= target)[0]
        i = int(ok[-1])
    else:
        raise MedtlInputError(
            None, f"unknown operating-point rule {rule!r}", "'youden', 'sensitivity:0.9' or 'specificity:0.9'"
        )
    return float(thr[i]), f"{kind} >= {target:g} on validation (sens {tpr[i]:.2f}, spec {1 - fpr[i]:.2f})"


def _smoothed_youden(labels: np.ndarray, scores: np.ndarray) -> float:
    """The cut-off of the highest Youden J on the kernel-smoothed ROC curve (Fluss, Faraggi & Reiser 2005).

    On a few dozen validation cases the empirical ROC is a staircase, and its best cut often sits on one
    case at the edge of a cliff: a little further, many cases flip. Each class's score distribution is
    smoothed with a Gaussian kernel on the logit scale (Silverman's bandwidth) and J is maximised on the
    smooth curves, which keeps the cut away from dense clusters of the other class.
    """
    from scipy.stats import norm

    eps = 1e-7
    logit = np.log(np.clip(scores, eps, 1 - eps) / (1 - np.clip(scores, eps, 1 - eps)))
    pos, neg = logit[labels == 1], logit[labels == 0]
    # large validation sets: each class summarised by 1000 quantiles (the smoothed CDF barely moves)
    pos, neg = (np.quantile(x, np.linspace(0, 1, 1000)) if len(x) > 1000 else x for x in (pos, neg))

    def bandwidth(x):
        sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
        iqr = float(np.subtract(*np.percentile(x, [75, 25])))
        spread = min(sd, iqr / 1.34) if iqr > 0 else sd
        return max(0.9 * spread * len(x) ** -0.2, 1e-3)

    grid = np.linspace(logit.min() - 1, logit.max() + 1, 2001)
    cdf = [
        np.mean([norm.cdf((grid - v) / h) for v in x], axis=0)
        for x, h in ((pos, bandwidth(pos)), (neg, bandwidth(neg)))
    ]
    j = cdf[1] - cdf[0]  # sensitivity - (1 - specificity) = F_neg(t) - F_pos(t)
    best = np.flatnonzero(j >= j.max() - 1e-9)
    return float(1 / (1 + np.exp(-grid[best[len(best) // 2]])))


def best_balanced_accuracy(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """The highest balanced accuracy that any threshold on ``scores`` reaches (the ROC curve's best
    (sensitivity + specificity) / 2): what a decision rule is measured against."""
    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores, dtype=np.float64))
    return float(np.max((tpr + 1 - fpr) / 2))


def _ratio(a, b) -> float | None:
    return float(a / b) if b else None


def _counts(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) of class-1 ``scores`` at ``threshold`` against 0/1 ``labels``."""
    y = np.asarray(labels) == 1
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    return int(np.sum(~pred & ~y)), fp, int(np.sum(~pred & y)), tp


def binary_rates(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float | None]:
    """Sensitivity, specificity and balanced accuracy (the mean of those two that are defined, as scikit-learn's)
    at ``threshold``; None where undefined. Counting only: cheap enough for thousands of bootstrap resamples."""
    tn, fp, fn, tp = _counts(labels, scores, threshold)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    defined = [v for v in (sensitivity, specificity) if v is not None]
    balanced = float(np.mean(defined)) if defined else None
    return {"sensitivity": sensitivity, "specificity": specificity, "balanced_accuracy": balanced}


def compute_binary_metrics(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float = 0.5) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1, accuracy, balanced accuracy at ``threshold`` on class-1 scores."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = _counts(labels, scores, threshold)
    return {
        "threshold": float(threshold),
        **binary_rates(labels, scores, threshold),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": float(f1_score(labels, pred, zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


# -- aggregation and bootstrap ---------------------------------------------------------------------


def aggregate_by_group(
    labels: npt.ArrayLike, probs: np.ndarray, groups: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, list]:
    """Patient- or study-level results: mean probability per group (labels must agree within a group)."""
    labels, probs, groups = np.asarray(labels), np.asarray(probs, np.float64), np.asarray(groups)
    keys = list(dict.fromkeys(groups.tolist()))
    out_l, out_p = [], []
    for k in keys:
        m = groups == k
        if len(np.unique(labels[m])) > 1:
            raise MedtlInputError(None, f"group {k!r} has images with different labels", "one label per patient/study")
        out_l.append(labels[m][0])
        out_p.append(probs[m].mean(axis=0))
    return np.asarray(out_l), np.stack(out_p), keys


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    groups: npt.ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(indices)`` over resamples of whole groups (patients).

    ``statistic`` takes image indices and may return None (undefined on that resample: skipped).
    """
    groups = np.asarray(groups)
    keys, inverse = np.unique(groups, return_inverse=True)
    members = [np.where(inverse == g)[0] for g in range(len(keys))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(keys), len(keys))
        v = statistic(np.concatenate([members[g] for g in pick]))
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < n_boot // 2:
        return None
    a = (1 - level) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def compute_auc_ci(
    labels: npt.ArrayLike, probs: np.ndarray, groups: npt.ArrayLike | None = None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """AUC with a 95% bootstrap interval resampling ``groups`` (patients; each image its own without)."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    auc = compute_auc(labels, probs, strict=True)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    ci = bootstrap_ci(lambda idx: compute_auc(labels[idx], probs[idx]), groups, n_boot, seed)
    return {
        "auc": auc,
        "auc_ci": ci,
        "n_boot": n_boot,
        "resampled": "patients" if len(set(groups.tolist())) < len(groups) else "images (one per patient)",
    }


# -- calibration -----------------------------------------------------------------------------------


def compute_ece(labels: npt.ArrayLike, probs: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, ``n_bins`` equal-width bins; multi-label 0/1
    ``labels``: the mean over the findings of each one's (binary) ECE."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    if labels.ndim == 2:
        _check_multi_label(labels, probs)
        return float(
            np.mean(
                [
                    compute_ece(labels[:, k], np.stack([1 - probs[:, k], probs[:, k]], 1), n_bins)
                    for k in range(labels.shape[1])
                ]
            )
        )
    _check(labels, probs)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_curve(labels: npt.ArrayLike, probs: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin mean confidence, accuracy and count (for a reliability diagram); multi-label 0/1 ``labels``:
    every finding's (binary) answers pooled."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    if labels.ndim == 2:
        labels, probs = labels.reshape(-1), probs.reshape(-1)
        probs = np.stack([1 - probs, probs], 1)
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = [
        {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": int((bins == b).sum()),
            "confidence": float(conf[bins == b].mean()) if (bins == b).any() else None,
            "accuracy": float(correct[bins == b].mean()) if (bins == b).any() else None,
        }
        for b in range(n_bins)
    ]
    return {"bins": rows}


def fit_temperature(logits: np.ndarray, labels: npt.ArrayLike) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on validation data (Guo et al. 2017);
    multi-label ``labels`` (0/1 rows): of ``sigmoid(logits / T)``, one T for all findings."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    multi = np.asarray(labels).ndim == 2
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64 if multi else torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    nll = torch.nn.functional.binary_cross_entropy_with_logits if multi else torch.nn.functional.cross_entropy

    def closure():
        opt.zero_grad()
        loss = nll(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def compute_nll(labels: npt.ArrayLike, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (multi-label: binary cross-entropy per finding)."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    if labels.ndim == 2:
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def seed_mean_ci(values) -> tuple[float, float]:
    """Mean over seeds and the half-width of its normal 95% interval (0 for a single seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
