"""The evaluation report's figures, drawn from an :class:`medtl.eval.evaluate.Evaluation` (nothing here
measures anything): ROC with its patient-bootstrap band, reliability, confusion matrix, learning curves
and the test cases' saliency maps."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from medtl.metrics import compute_auc, compute_ece, reliability_curve


def _pyplot():
    """matplotlib's pyplot on the Agg backend. Imported on first use: it is heavy and only figures need it."""
    import matplotlib  # heavy optional import, on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_study(fig, ax, png: Path, table_lines: list[str], markdown: Path) -> None:
    """Finish a study's plot (legend, layout), write it as PNG, and its Markdown table next to it."""
    plt = _pyplot()

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    markdown.write_text("\n".join(table_lines) + "\n")


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt = _pyplot()

    plt.close(fig)
    return buf.getvalue()


def _roc_figure(labels, scores, groups, n_boot, seed):
    plt = _pyplot()

    grid = np.linspace(0, 1, 101)
    fpr, tpr, _ = roc_curve(labels, scores)
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.where(inverse == g)[0] for g in range(len(keys))]
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(keys), len(keys))])
        if len(np.unique(labels[idx])) < 2:
            continue
        f, t, _ = roc_curve(labels[idx], scores[idx])
        curves.append(np.interp(grid, f, t))
    lo, hi = np.quantile(curves, [0.025, 0.975], axis=0)
    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=110)
    ax.fill_between(grid, lo, hi, alpha=0.25, label="95% CI (patient bootstrap)")
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC {compute_auc(labels, np.stack([1 - scores, scores], 1)):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Test ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _fig_png(fig)


def _roc_findings_figure(labels, probs, names):
    """Multi-label: each finding's test ROC curve in one plot."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    for k, name in enumerate(names):
        if len(np.unique(labels[:, k])) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels[:, k], probs[:, k])
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {roc_auc_score(labels[:, k], probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Test ROC per finding")
    ax.legend(loc="lower right", fontsize=7)
    return _fig_png(fig)


def _reliability_figure(labels, before, after, t):
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=110)
    for probs, name in ((before, "before"), (after, f"after (T = {t:.2f})")):
        rows = [r for r in reliability_curve(labels, probs)["bins"] if r["count"]]
        ax.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            "o-",
            label=f"{name}: ECE {compute_ece(labels, probs):.3f}",
        )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability (test, 15 bins)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    return _fig_png(fig)


def _confusion_figure(cm, class_names, title):
    plt = _pyplot()

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=110)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=11)
    ax.set(
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    return _fig_png(fig)


def _curves_figure(history_path: Path):
    plt = _pyplot()

    rows = []
    if history_path.is_file():
        with open(history_path, newline="") as f:
            rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    if rows:
        ep = [int(r["epoch"]) for r in rows]
        ax.plot(ep, [float(r["train_loss"] or "nan") for r in rows], label="train loss")
        ax.plot(ep, [float(r["val_loss"] or "nan") for r in rows], label="validation loss")
        ax2 = ax.twinx()
        ax2.plot(ep, [float(r["val_auc"]) if r["val_auc"] else np.nan for r in rows], "g.-", label="validation AUC")
        ax2.set_ylabel("validation AUC")
        ax2.legend(loc="lower right", fontsize=8)
    ax.set(xlabel="epoch", ylabel="loss", title="Learning curves")
    ax.legend(loc="upper right", fontsize=8)
    return _fig_png(fig)


def _case_grid(cases):
    plt = _pyplot()

    n = len(cases)
    fig, axes = plt.subplots(2, max(1, n), figsize=(2.1 * max(1, n), 4.4), dpi=110, squeeze=False)
    for j, case in enumerate(cases):
        axes[0, j].imshow(case["image"], cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(case["overlay"])
        axes[0, j].set_title(
            f"{'correct' if case['correct'] else 'WRONG'}\ntrue {case['true']} / pred {case['pred']}"
            f"\np={case['p']:.2f}",
            fontsize=7,
            color="black" if case["correct"] else "red",
        )
        for a in axes[:, j]:
            a.set_axis_off()
    fig.suptitle("Test cases and their Grad-CAM maps", fontsize=9)
    return _fig_png(fig)


def evaluation_figures(ev, history_path: Path, n_boot: int = 300, seed: int = 0) -> dict[str, bytes]:
    """The report's figures as PNG bytes, drawn from an :class:`medtl.eval.evaluate.Evaluation`."""
    figures: dict[str, bytes] = {}
    if ev.result.get("multi_label"):
        figures["roc"] = _roc_findings_figure(ev.test_labels, ev.test_probs, ev.class_names)
    elif ev.decision.threshold is not None:
        op = ev.result["operating_point"]
        d = ev.decision
        figures["confusion"] = _confusion_figure(
            op["confusion_matrix"],
            [ev.class_names[1 - d.positive], d.finding],  # (the matrix is of the positive class against the other)
            f"At the operating point (p({d.finding}) >= {op['threshold']:.2f})",
        )
        figures["roc"] = _roc_figure(*d.positive_view(ev.test_labels, ev.test_probs), ev.patients, n_boot, seed)
    figures["reliability"] = _reliability_figure(
        ev.test_labels, ev.test_probs_raw, ev.test_probs, ev.decision.temperature or 1.0
    )
    figures["learning_curves"] = _curves_figure(history_path)
    if ev.cases:
        figures["cases"] = _case_grid(ev.cases)
    return figures


__all__ = ["evaluation_figures", "save_study"]
