"""``evaluate_run``: a run folder in, an honest evaluation out.

Writes into ``RUN/evaluation/``: ``report.html`` (self-contained: figures embedded, opens
offline), the figures as PNG, ``evaluation.json``, and ``model_card.md`` / ``model_card.json``.
The temperature (fitted on validation data) and the operating point (chosen on validation data)
are saved into the run's ``model.safetensors``, so predictions and the UI use them.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from medtl import __version__
from medtl.checkpoint import SavedRun, load_saved_run, save_model
from medtl.config import to_plain
from medtl.data import create_dataset, store_options
from medtl.data.manifest import label_counts, label_text
from medtl.errors import RunError
from medtl.explain import METHODS, compute_saliency, explain_input, run_sanity_checks
from medtl.models import create_model
from medtl.data.dataset import study_index
from medtl.predict import extract_features, fit_decision, predict_logits
from medtl.runtime import Runtime, inference_precision, resolve_device
from medtl.train import fit, prepare_data, read_data
from medtl.transforms import create_transforms, display_image
from medtl.eval.metrics import (
    bootstrap_ci,
    compute_auc,
    compute_auc_ci,
    compute_binary_metrics,
    compute_ece,
    compute_nll,
    reliability_curve,
)

log = logging.getLogger("medtl.eval")

INTENDED_USE = ("Research on transfer learning for medical image classification. Not a medical device: "
                "not for diagnosis, triage or any clinical decision.")


def _pyplot():
    """matplotlib's pyplot on the Agg backend. Imported on first use: it is heavy and only figures need it."""
    import matplotlib  # heavy optional import, on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seed_mean_ci(values) -> tuple[float, float]:
    """Mean over seeds and the half-width of its normal 95% interval (0 for a single seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


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
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-",
                label=f"{name}: ECE {compute_ece(labels, probs):.3f}")
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
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
           yticklabels=class_names, xlabel="predicted", ylabel="true", title=title)
    return _fig_png(fig)


def _curves_figure(history_path: Path):
    plt = _pyplot()

    rows = list(csv.DictReader(open(history_path))) if history_path.is_file() else []
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
        axes[0, j].set_title(f"{'correct' if case['correct'] else 'WRONG'}\ntrue {case['true']} / pred {case['pred']}"
                             f"\np={case['p']:.2f}", fontsize=7, color="black" if case["correct"] else "red")
        for a in axes[:, j]:
            a.set_axis_off()
    fig.suptitle("Test cases and their Grad-CAM maps", fontsize=9)
    return _fig_png(fig)


@dataclass
class Evaluation:
    """What :func:`compute_evaluation` measured: the JSON-ready ``result`` and the arrays the figures
    are drawn from. Nothing here is rendered."""

    result: dict  # AUC with CI, calibration, operating point, subgroups, saliency sanity (evaluation.json)
    class_names: list[str]
    test_labels: np.ndarray  # (n_studies,) test labels
    test_probs_raw: np.ndarray  # (n_studies, classes) before temperature scaling
    test_probs: np.ndarray  # (n_studies, classes) after temperature scaling
    patients: np.ndarray  # (n_studies,) patient of each test study (the bootstrap's unit)
    temperature: float  # fitted on validation logits
    operating_point: dict | None  # {"threshold", "rule"}, chosen on validation (binary tasks)
    cases: list[dict] = field(default_factory=list)  # wrong and correct test cases with their Grad-CAM overlays


def compute_evaluation(saved: SavedRun, cfg, prepared, runtime: Runtime, n_boot: int = 1000,
                       operating_point: str = "youden", methods: tuple[str, ...] = METHODS,
                       sanity_images: int = 3, data_randomisation: bool = True, seed: int = 0) -> Evaluation:
    """Measure a saved run on ``prepared``'s test split: every choice (temperature, operating point) is
    made on the validation split; intervals resample patients."""
    model, pre, class_names = saved.model, saved.preprocessing, saved.class_names
    _, val_ds, test_ds = prepared.datasets(cfg.data, pre)
    val_logits, test_logits = (predict_logits(model, ds, runtime, 64) for ds in (val_ds, test_ds))
    temperature, op = fit_decision(val_logits, len(class_names), operating_point)
    val_y, val_p_raw = val_logits.study_probs()
    _, val_p_cal = val_logits.study_probs(temperature)
    test_y, test_p_raw = test_logits.study_probs()
    _, test_p = test_logits.study_probs(temperature)
    test_studies = prepared.sets["test"]
    patients = np.asarray([s["patient_id"] for s in test_studies])
    result: dict = {"run": saved.run_dir.name, "date": datetime.date.today().isoformat(),
                    "data": Path(cfg.data.path).name, "n_test_images": int(len(test_y)),
                    "n_test_patients": int(len(set(patients.tolist()))), "class_names": class_names,
                    "precision": runtime.precision, "device": str(runtime.device)}
    result["auc"] = compute_auc_ci(test_y, test_p, patients, n_boot, seed)
    result["calibration"] = {
        "temperature": temperature, "val_nll_before": compute_nll(val_y, val_p_raw),
        "val_nll_after": compute_nll(val_y, val_p_cal),
        "test_ece_before": compute_ece(test_y, test_p_raw), "test_ece_after": compute_ece(test_y, test_p),
        "test_ece_after_ci": bootstrap_ci(lambda i: compute_ece(test_y[i], test_p[i]), patients, n_boot, seed)}
    if saved.multi_label:
        result["multi_label"] = True
        result["per_label"] = _per_label(test_y, test_p_raw, test_p, op, class_names, patients, n_boot, seed)
        pred = (test_p >= np.asarray(op["thresholds"])[None, :]).astype(int)
    elif op is not None:
        result["operating_point"] = {**op, **_binary_metrics_ci(test_y, test_p[:, 1], op["threshold"], patients,
                                                                n_boot, seed)}
    result["subgroups"] = _subgroups(test_studies, test_y, test_p, patients, n_boot, seed)
    if not saved.multi_label:
        pred = (test_p[:, 1] >= op["threshold"]).astype(int) if op else test_p.argmax(1)
    inputs, cases = _cases(model, test_ds, test_studies, test_y, test_p, pred, class_names, runtime)
    shuffled = _train_on_shuffled_labels(cfg, prepared, pre, len(class_names), seed, runtime) \
        if data_randomisation else None
    result["saliency_sanity"] = []
    for method in methods:
        res = run_sanity_checks(model, inputs[:sanity_images],
                                lambda m, x, c, meth=method: compute_saliency(m, x, c, meth, runtime=runtime), method,
                                shuffled, seed, runtime=runtime)
        result["saliency_sanity"].append(res.to_dict())
        log.info("saliency %s: %s", method, res.verdict)
    return Evaluation(result, class_names, test_y, test_p_raw, test_p, patients, temperature, op, cases)


def _per_label(labels, probs_raw, probs, op, names, patients, n_boot, seed) -> dict:
    """Multi-label: each finding's AUC with its patient-bootstrap interval, the metrics at its operating point
    (chosen on validation) with intervals, and its calibration before and after temperature scaling."""
    out = {}
    for k, name in enumerate(names):
        y, p = labels[:, k], probs[:, k]
        row = {"n_positive": int(y.sum()), "prevalence": float(y.mean()), "rule": op["rules"][k]}
        if len(np.unique(y)) == 2:
            row.update(compute_auc_ci(y, np.stack([1 - p, p], 1), patients, n_boot, seed))
            row.update(_binary_metrics_ci(y, p, op["thresholds"][k], patients, n_boot, seed))
        else:
            row.update(auc=None, auc_ci=None, threshold=op["thresholds"][k],
                       why="the test studies are all of one kind for this finding")
        row["ece_before"] = compute_ece(y, np.stack([1 - probs_raw[:, k], probs_raw[:, k]], 1))
        row["ece_after"] = compute_ece(y, np.stack([1 - p, p], 1))
        out[name] = row
    return out


def _binary_metrics_ci(labels, scores, threshold, patients, n_boot, seed) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1 at ``threshold``, with patient-bootstrap CIs for the first three."""
    at = compute_binary_metrics(labels, scores, threshold)
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
        at[f"{key}_ci"] = bootstrap_ci(lambda i, k=key: compute_binary_metrics(labels[i], scores[i], threshold)[k],
                                       patients, n_boot, seed)
    return at


SUBGROUP_COLUMNS = ("site", "modality", "sex", "scanner")  # manifest columns that define subgroups


def _subgroups(studies, labels, probs, patients, n_boot, seed) -> dict:
    """AUC (with CI) per value of each subgroup column the test studies carry (two values at least)."""
    subgroups = {}
    for column in SUBGROUP_COLUMNS:
        values = [s.get(column) for s in studies]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        rows = []
        for v in sorted(set(values)):
            m = np.asarray([x == v for x in values])
            row = {"value": v, "n": int(m.sum())}
            if len(np.unique(labels[m])) == 2:
                row.update(compute_auc_ci(labels[m], probs[m], patients[m], n_boot, seed))
            rows.append(row)
        subgroups[column] = rows
    return subgroups


def _cases(model, test_ds, studies, labels, probs, pred, class_names, runtime) -> tuple[list, list[dict]]:
    """Up to 3 wrong and 5 correct test studies: their middle model input and a Grad-CAM overlay (multi-label:
    wrong when any finding is, the map of the most probable finding)."""
    inputs, cases = [], []
    multi = labels.ndim == 2
    right = (pred == labels).all(axis=1) if multi else pred == labels
    order = list(np.where(~right)[0][:3]) + list(np.where(right)[0][:5])
    for i in order[:8]:
        parts = [p for p in test_ds.data if p.get("study") == i]
        x = test_ds.transform(parts[len(parts) // 2])["image"][None]
        inputs.append(x)
        image = display_image(studies[i])
        target = int(probs[i].argmax()) if multi else int(pred[i])
        _, overlay = explain_input(model, x, image, target, "gradcam", runtime)
        cases.append({"image": image, "overlay": overlay, "true": label_text(labels[i], class_names),
                      "pred": label_text(pred[i], class_names), "p": float(probs[i, target]),
                      "correct": bool(right[i])})
    return inputs, cases


def evaluation_figures(ev: Evaluation, history_path: Path, n_boot: int = 300, seed: int = 0) -> dict[str, bytes]:
    """The report's figures as PNG bytes, drawn from an :class:`Evaluation`."""
    figures: dict[str, bytes] = {}
    if ev.result.get("multi_label"):
        figures["roc"] = _roc_findings_figure(ev.test_labels, ev.test_probs, ev.class_names)
    elif ev.operating_point is not None:
        op = ev.result["operating_point"]
        figures["confusion"] = _confusion_figure(op["confusion_matrix"], ev.class_names,
                                                 f"At the operating point (p1 >= {op['threshold']:.2f})")
        figures["roc"] = _roc_figure(ev.test_labels, ev.test_probs[:, 1], ev.patients, n_boot, seed)
    figures["reliability"] = _reliability_figure(ev.test_labels, ev.test_probs_raw, ev.test_probs, ev.temperature)
    figures["learning_curves"] = _curves_figure(history_path)
    if ev.cases:
        figures["cases"] = _case_grid(ev.cases)
    return figures


def evaluate_run(run_dir: str | Path, data: str | None = None, n_boot: int = 1000, operating_point: str = "youden",
                 methods: tuple[str, ...] = METHODS, sanity_images: int = 3, data_randomisation: bool = True,
                 seed: int = 0, device: str = "auto", foreign: list[str | Path] | None = None) -> dict:
    """Evaluate a run on its test split (or on ``data``); write the report, figures and model card (see
    module doc) and save the temperature and operating point into the run's model. Models run on ``device``.

    ``foreign``: files unlike the training data (other modalities, body parts, photographs): the report
    gives the out-of-distribution detector's AUROC against the test studies, and its refusal rates."""
    run_dir = Path(run_dir)
    saved = load_saved_run(run_dir)
    cfg = saved.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    runtime = Runtime(resolve_device(device), inference_precision(None), tta=cfg.train.tta)
    runtime.prepare(saved.model)
    manifest = read_data(cfg.data)
    if manifest.class_names != saved.class_names:
        raise RunError(f"{cfg.data.path}: classes {manifest.class_names} differ from the model's {saved.class_names}")
    prepared = prepare_data(cfg.data, saved.preprocessing, cfg.train.seed, manifest)
    ev = compute_evaluation(saved, cfg, prepared, runtime, n_boot, operating_point, methods, sanity_images,
                            data_randomisation, seed)
    save_model(saved.model, run_dir / "model.safetensors", saved.encoder, saved.class_names, saved.preprocessing,
               ev.temperature, ev.operating_point, saved.multi_label)
    ev.result["ood"] = _ood_check(run_dir, saved, cfg, prepared, runtime, foreign or [], device)
    figures = evaluation_figures(ev, run_dir / "history.csv", min(n_boot, 300), seed)
    card = model_card(run_dir, ev.result, prepared, cfg, saved)
    out = run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "evaluation.json").write_text(json.dumps(to_plain(ev.result), indent=2))
    (out / "model_card.json").write_text(json.dumps(to_plain(card), indent=2))
    (out / "model_card.md").write_text(model_card_markdown(card))
    (out / "report.html").write_text(report_html(ev.result, card, figures))
    log.info("evaluation written to %s", out)
    return ev.result


def _ood_check(run_dir: Path, saved: SavedRun, cfg, prepared, runtime: Runtime, foreign: list, device: str) -> dict:
    """The out-of-distribution detector against ``foreign`` files (see :func:`medtl.ood.foreign_check`)."""
    from medtl.inference import Predictor
    from medtl.ood import foreign_check, study_scores

    predictor = Predictor(run_dir, device=device)
    if predictor.ood is None:
        return {"measured": False, "why": "the run has no out-of-distribution detector"}
    if not foreign:
        return {"measured": False, **predictor.ood.describe(),
                "why": "no foreign images given (medtl evaluate --foreign FILE...)"}
    _, _, test_ds = prepared.datasets(cfg.data, saved.preprocessing)
    features, _ = extract_features(predictor.model, test_ds, predictor.runtime)
    in_scores = study_scores(predictor.ood.score(features), study_index(test_ds))
    return {**predictor.ood.describe(), **foreign_check(predictor, in_scores, foreign)}


def _train_on_shuffled_labels(cfg, prepared, pre, n_classes, seed, runtime: Runtime):
    """The same encoder and strategy trained on permuted training labels (data randomisation test)."""
    rng = np.random.default_rng(seed + 99)
    train = [dict(s) for s in prepared.sets["train"]]
    for s, y in zip(train, rng.permutation(np.asarray([s["label"] for s in train]))):
        s["label"] = tuple(int(v) for v in y) if np.ndim(y) else int(y)  # multi-label: whole rows move
    _, final_train = create_transforms(cfg.data, pre, train=True)
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    torch.manual_seed(seed)
    model, _ = create_model(cfg.encoder, n_classes)  # the same network as the run's (drop_rate too)
    short = dataclasses.replace(cfg.train, frozen_epochs=min(cfg.train.frozen_epochs, 2),
                                epochs=min(cfg.train.epochs, 3), device=str(runtime.device))
    log.info("training on shuffled labels for the data randomisation test (%d + %d epochs)", short.frozen_epochs,
             short.epochs)
    store = store_options(cfg.data)
    fit(model, create_dataset(train, final_train, **store), create_dataset(prepared.sets["val"], final_eval, **store),
        short, n_classes)
    return model.eval()


def model_card(run_dir: Path, result: dict, prepared, cfg, saved: SavedRun) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    m = prepared.manifest
    limits = [f"Test set of {result['n_test_images']} images from {result['n_test_patients']} patients: intervals "
              "are wide; confirm on data from your own site before any use."]
    if m.kind == "medmnist":
        limits.append("Trained on MedMNIST images (28 px originals, upscaled): far below clinical resolution.")
    if not result.get("subgroups"):
        limits.append("No site, sex or scanner columns: performance across subgroups is unknown.")
    cal = result["calibration"]
    if cal["test_ece_after"] > cal["test_ece_before"]:
        limits.append(f"Temperature scaling fitted on {sum(len(p) for n, p in prepared.sets.items() if n == 'val')} "
                      f"validation images raised the test ECE ({cal['test_ece_before']:.3f} → "
                      f"{cal['test_ece_after']:.3f}): the validation set is too small to calibrate reliably.")
    for s in result.get("saliency_sanity", []):
        if not s["passed"]:
            limits.append(f"Saliency method {s['method']} failed its randomisation sanity check: do not rely on it.")
    counts = {name: label_counts([s["label"] for s in part], m.class_names) for name, part in prepared.sets.items()}
    return {"model": run_dir.name, "encoder": saved.encoder, "version": __version__,
            "date": result["date"], "intended_use": INTENDED_USE,
            "training_data": {"source": Path(cfg.data.path).name, "kind": m.kind, "split": prepared.split_source,
                              "label_counts": counts,
                              "patients": {n: len({s["patient_id"] for s in p}) for n, p in prepared.sets.items()}},
            "training": {"strategy": metrics.get("strategy", cfg.train.strategy),
                         "strategy_reason": metrics.get("strategy_reason", ""), "input_size": saved.preprocessing.input_size,
                         "pretrained": cfg.encoder.pretrained},
            "metrics": {"test_auc": result["auc"]["auc"], "test_auc_95ci": result["auc"]["auc_ci"],
                        "operating_point": result.get("operating_point"), "per_label": result.get("per_label")},
            "calibration": result["calibration"],
            "ood": {k: v for k, v in result.get("ood", {}).items() if k != "foreign"},
            "saliency": [{"method": s["method"], "passed": s["passed"]} for s in result.get("saliency_sanity", [])],
            "known_limits": limits}



def _fmt_ci(v, ci, digits=3) -> str:
    """``0.912 (95% CI 0.871–0.950)``, or ``n/a``."""
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" + (f" (95% CI {ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("medtl.eval", "templates"),
                                autoescape=jinja2.select_autoescape(["html.j2"]), keep_trailing_newline=True,
                                undefined=jinja2.StrictUndefined)
_TEMPLATES.filters["ci"] = lambda v, ci=None: _fmt_ci(v, ci)


def model_card_markdown(card: dict) -> str:
    """The model card as Markdown (template ``templates/model_card.md.j2``)."""
    return _TEMPLATES.get_template("model_card.md.j2").render(card=card)


def report_html(result: dict, card: dict, figures: dict[str, bytes]) -> str:
    """The self-contained HTML report (template ``templates/report.html.j2``; figures embedded)."""
    encoded = {name: base64.b64encode(png).decode() for name, png in figures.items()}
    return _TEMPLATES.get_template("report.html.j2").render(result=result, card=card, figures=encoded,
                                                          intended_use=INTENDED_USE)


__all__ = ["evaluate_run", "compute_evaluation", "Evaluation", "evaluation_figures", "model_card",
           "model_card_markdown", "report_html", "seed_mean_ci", "save_study", "INTENDED_USE"]
