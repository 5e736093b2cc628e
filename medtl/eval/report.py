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
import html
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from medtl import __version__
from medtl.config import to_plain
from medtl.errors import RunError
from medtl.predict import predict_logits
from medtl.eval.metrics import (
    bootstrap_ci,
    choose_threshold,
    compute_auc,
    compute_auc_ci,
    compute_binary_metrics,
    compute_ece,
    compute_nll,
    fit_temperature,
    reliability_curve,
)

log = logging.getLogger("medtl.eval")

INTENDED_USE = ("Research on transfer learning for medical image classification. Not a medical device: "
                "not for diagnosis, triage or any clinical decision.")


def seed_mean_ci(values) -> tuple[float, float]:
    """Mean over seeds and the half-width of its normal 95% interval (0 for a single seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def save_study(fig, ax, png: Path, table_lines: list[str], markdown: Path) -> None:
    """Finish a study's plot (legend, layout), write it as PNG, and its Markdown table next to it."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    markdown.write_text("\n".join(table_lines) + "\n")


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _roc_figure(labels, scores, groups, n_boot, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

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


def _reliability_figure(labels, before, after, t):
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=110)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=11)
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
           yticklabels=class_names, xlabel="predicted", ylabel="true", title=title)
    return _fig_png(fig)


def _curves_figure(history_path: Path):
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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


def evaluate_run(run_dir: str | Path, data: str | None = None, n_boot: int = 1000, operating_point: str = "youden",
                 methods: tuple[str, ...] = ("gradcam", "gradcampp", "occlusion", "integrated_gradients"),
                 sanity_images: int = 3, data_randomisation: bool = True, seed: int = 0,
                 device: str = "auto") -> dict:
    """Evaluate a run on its test split; write the report, figures and model card (see module doc).
    Models run on ``device``."""
    from medtl.checkpoint import save_model
    from medtl.explain.sanity import run_sanity_checks
    from medtl.explain.saliency import compute_saliency, create_overlay
    from medtl.inference import load_run
    from medtl.train.experiment import prepare_data, read_data
    from medtl.transforms import input_to_original

    run_dir = Path(run_dir)
    predictor = load_run(run_dir, device=device)
    cfg = predictor.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    model, pre, class_names = predictor.model, predictor.preprocessing, predictor.class_names
    manifest = read_data(cfg.data)
    if manifest.class_names != class_names:
        raise RunError(f"{cfg.data.path}: classes {manifest.class_names} differ from the model's {class_names}")
    prepared = prepare_data(cfg.data, pre, cfg.train.seed, manifest)
    _, val_ds, test_ds = prepared.datasets(cfg.data, pre)
    out = run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    figures: dict[str, bytes] = {}

    runtime = predictor.runtime
    val_logits, test_logits = (predict_logits(model, ds, runtime, 64) for ds in (val_ds, test_ds))
    temperature = fit_temperature(val_logits.logits, val_logits.labels)
    val_y, val_p_raw = val_logits.study_probs()
    _, val_p_cal = val_logits.study_probs(temperature)
    test_y, test_p_raw = test_logits.study_probs()
    _, test_p = test_logits.study_probs(temperature)
    test_studies = prepared.sets["test"]
    patients = np.asarray([s["patient_id"] for s in test_studies])
    binary = len(class_names) == 2

    result: dict = {"run": run_dir.name, "date": datetime.date.today().isoformat(), "data": Path(cfg.data.path).name,
                    "n_test_images": int(len(test_y)), "n_test_patients": int(len(set(patients.tolist()))),
                    "class_names": class_names}
    result["auc"] = compute_auc_ci(test_y, test_p, patients, n_boot, seed)
    result["calibration"] = {
        "temperature": temperature, "val_nll_before": compute_nll(val_y, val_p_raw),
        "val_nll_after": compute_nll(val_y, val_p_cal),
        "test_ece_before": compute_ece(test_y, test_p_raw), "test_ece_after": compute_ece(test_y, test_p),
        "test_ece_after_ci": bootstrap_ci(lambda i: compute_ece(test_y[i], test_p[i]), patients, n_boot, seed)}
    op = None
    if binary:
        threshold, rule = choose_threshold(val_y, val_p_cal[:, 1], operating_point)
        at = compute_binary_metrics(test_y, test_p[:, 1], threshold)
        for key in ("sensitivity", "specificity", "balanced_accuracy"):
            at[f"{key}_ci"] = bootstrap_ci(
                lambda i, k=key: compute_binary_metrics(test_y[i], test_p[i, 1], threshold)[k], patients, n_boot, seed)
        op = {"threshold": threshold, "rule": rule}
        result["operating_point"] = {**op, **at}
        figures["confusion"] = _confusion_figure(at["confusion_matrix"], class_names, f"At the operating point "
                                                 f"(p1 >= {threshold:.2f})")
        figures["roc"] = _roc_figure(test_y, test_p[:, 1], patients, min(n_boot, 300), seed)
    # subgroups: any manifest column other than the required ones
    subgroups = {}
    for column in ("site", "modality", "study_id", "sex", "scanner"):
        values = [s.get(column) for s in test_studies]
        if any(v is None for v in values) or len(set(values)) < 2 or column == "study_id":
            continue
        rows = []
        for v in sorted(set(values)):
            m = np.asarray([x == v for x in values])
            row = {"value": v, "n": int(m.sum())}
            if len(np.unique(test_y[m])) == 2:
                row.update(compute_auc_ci(test_y[m], test_p[m], patients[m], n_boot, seed))
            rows.append(row)
        subgroups[column] = rows
    result["subgroups"] = subgroups
    figures["reliability"] = _reliability_figure(test_y, test_p_raw, test_p, temperature)
    figures["learning_curves"] = _curves_figure(run_dir / "history.csv")

    # saliency: a grid of correct and wrong cases, and the sanity checks of every method
    inputs, cases = [], []
    pred = (test_p[:, 1] >= op["threshold"]).astype(int) if binary else test_p.argmax(1)
    order = list(np.where(pred != test_y)[0][:3]) + list(np.where(pred == test_y)[0][:5])
    for i in order[:8]:
        s = test_studies[i]
        parts = [p for p in test_ds.data if p.get("study") == i]
        x = test_ds.transform(parts[len(parts) // 2])["image"][None]
        inputs.append(x)
        cam = compute_saliency(model, x, int(pred[i]), "gradcam", runtime=runtime)
        img = np.asarray(s["image"][len(s["image"]) // 2])  # the middle channel: the slice itself
        sal = input_to_original(cam, img.shape, pre.input_size)
        cases.append({"image": img, "overlay": create_overlay(img, sal), "true": class_names[int(test_y[i])],
                      "pred": class_names[int(pred[i])], "p": float(test_p[i, int(pred[i])]),
                      "correct": bool(pred[i] == test_y[i])})
    if cases:
        figures["cases"] = _case_grid(cases)
    shuffled = _train_on_shuffled_labels(cfg, prepared, pre, len(class_names), seed) if data_randomisation else None
    sanity = []
    for method in methods:
        res = run_sanity_checks(model, inputs[:sanity_images],
                                lambda m, x, c, meth=method: compute_saliency(m, x, c, meth, runtime=runtime), method,
                                shuffled, seed, runtime=runtime)
        sanity.append(res.to_dict())
        log.info("saliency %s: %s", method, res.verdict)
    result["saliency_sanity"] = sanity

    save_model(model, run_dir / "model.safetensors", predictor.encoder, class_names, pre, temperature, op)
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "evaluation.json").write_text(json.dumps(to_plain(result), indent=2))
    card = model_card(run_dir, result, prepared, cfg, predictor)
    (out / "model_card.json").write_text(json.dumps(to_plain(card), indent=2))
    (out / "model_card.md").write_text(model_card_markdown(card))
    (out / "report.html").write_text(report_html(result, card, figures))
    log.info("evaluation written to %s", out)
    return result


def _train_on_shuffled_labels(cfg, prepared, pre, n_classes, seed):
    """The same encoder and strategy trained on permuted training labels (data randomisation test)."""
    from medtl.models import create_model
    from medtl.train.fit import fit

    rng = np.random.default_rng(seed + 99)
    train = [dict(s) for s in prepared.sets["train"]]
    for s, y in zip(train, rng.permutation([s["label"] for s in train])):
        s["label"] = int(y)
    from medtl.data import create_dataset
    from medtl.transforms import create_transforms

    _, final_train = create_transforms(cfg.data, pre, train=True)
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    torch.manual_seed(seed)
    model, _ = create_model(cfg.encoder, n_classes)  # the same network as the run's (drop_rate too)
    short = dataclasses.replace(cfg.train, frozen_epochs=min(cfg.train.frozen_epochs, 2),
                                epochs=min(cfg.train.epochs, 3))
    log.info("training on shuffled labels for the data randomisation test (%d + %d epochs)", short.frozen_epochs,
             short.epochs)
    fit(model, create_dataset(train, final_train), create_dataset(prepared.sets["val"], final_eval), short, n_classes)
    return model.eval()


def model_card(run_dir: Path, result: dict, prepared, cfg, predictor) -> dict:
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
    counts = {name: {c: sum(s["label"] == i for s in part) for i, c in enumerate(m.class_names)}
              for name, part in prepared.sets.items()}
    return {"model": run_dir.name, "encoder": predictor.encoder, "version": __version__,
            "date": result["date"], "intended_use": INTENDED_USE,
            "training_data": {"source": Path(cfg.data.path).name, "kind": m.kind, "split": prepared.split_source,
                              "label_counts": counts,
                              "patients": {n: len({s["patient_id"] for s in p}) for n, p in prepared.sets.items()}},
            "training": {"strategy": metrics.get("strategy", cfg.train.strategy),
                         "strategy_reason": metrics.get("strategy_reason", ""), "input_size": predictor.preprocessing.input_size,
                         "pretrained": cfg.encoder.pretrained},
            "metrics": {"test_auc": result["auc"]["auc"], "test_auc_95ci": result["auc"]["auc_ci"],
                        "operating_point": result.get("operating_point")},
            "calibration": result["calibration"],
            "saliency": [{"method": s["method"], "passed": s["passed"]} for s in result.get("saliency_sanity", [])],
            "known_limits": limits}



def _fmt_ci(v, ci, digits=3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" + (f" (95% CI {ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


def model_card_markdown(card: dict) -> str:
    m, c = card["metrics"], card["calibration"]
    lines = [f"# Model card: {card['model']}", "", f"*{card['encoder']}, medtl {card['version']}, {card['date']}*", "",
             "## Intended use", card["intended_use"], "", "## Training data",
             f"- source: {card['training_data']['source']} ({card['training_data']['kind']}); split "
             f"{card['training_data']['split']}",
             *[f"- {k}: {v} (patients: {card['training_data']['patients'][k]})"
               for k, v in card["training_data"]["label_counts"].items()], "",
             "## Training", f"- strategy: {card['training']['strategy']} — {card['training']['strategy_reason']}",
             f"- input size: {card['training']['input_size']} px; ImageNet-pretrained: {card['training']['pretrained']}",
             "", "## Test metrics", f"- AUC: {_fmt_ci(m['test_auc'], m['test_auc_95ci'])}"]
    op = m.get("operating_point")
    if op:
        lines += [f"- operating point: {op['rule']} → threshold {op['threshold']:.3f}",
                  f"- sensitivity: {_fmt_ci(op['sensitivity'], op.get('sensitivity_ci'))}",
                  f"- specificity: {_fmt_ci(op['specificity'], op.get('specificity_ci'))}",
                  f"- PPV {op['ppv'] if op['ppv'] is None else round(op['ppv'], 3)}, NPV "
                  f"{op['npv'] if op['npv'] is None else round(op['npv'], 3)}, F1 {op['f1']:.3f}"]
    lines += ["", "## Calibration", f"- temperature {c['temperature']:.3f} (fitted on validation data)",
              f"- test ECE before {c['test_ece_before']:.3f}, after {_fmt_ci(c['test_ece_after'], c['test_ece_after_ci'])}",
              "", "## Saliency sanity checks",
              *[f"- {s['method']}: {'passed' if s['passed'] else 'FAILED — do not rely on it'}" for s in card["saliency"]],
              "", "## Known limits", *[f"- {x}" for x in card["known_limits"]], ""]
    return "\n".join(lines)


def report_html(result: dict, card: dict, figures: dict[str, bytes]) -> str:
    def img(name, alt):
        if name not in figures:
            return ""
        return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
                f'{base64.b64encode(figures[name]).decode()}"><figcaption>{html.escape(alt)}</figcaption></figure>')

    rows = []
    for s in result.get("saliency_sanity", []):
        cascade = ", ".join(f"{c['randomised']}: {c['spearman']:.2f}" for c in s["cascade"])
        dr = "—" if s["data_randomisation"] is None else f"{s['data_randomisation']:.2f}"
        rows.append(f"<tr><td>{s['method']}</td><td>{html.escape(cascade)}</td><td>{dr}</td>"
                    f"<td class='{'ok' if s['passed'] else 'bad'}'>{html.escape(s['verdict'])}</td></tr>")
    sub_rows = []
    for col, entries in result.get("subgroups", {}).items():
        for e in entries:
            sub_rows.append(f"<tr><td>{html.escape(col)}</td><td>{html.escape(str(e['value']))}</td><td>{e['n']}</td>"
                            f"<td>{_fmt_ci(e.get('auc'), e.get('auc_ci'))}</td></tr>")
    op = result.get("operating_point")
    op_html = "" if not op else (
        f"<p>Operating point: {html.escape(op['rule'])} → threshold {op['threshold']:.3f}. Sensitivity "
        f"{_fmt_ci(op['sensitivity'], op.get('sensitivity_ci'))}, specificity "
        f"{_fmt_ci(op['specificity'], op.get('specificity_ci'))}, balanced accuracy "
        f"{_fmt_ci(op['balanced_accuracy'], op.get('balanced_accuracy_ci'))}, PPV {op['ppv'] or 0:.3f}, "
        f"NPV {op['npv'] or 0:.3f}, F1 {op['f1']:.3f}.</p>")
    c = result["calibration"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figure img{max-width:520px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;font-size:14px}"
             ".ok{color:#176117}.bad{color:#b00020;font-weight:bold}.note{background:#fff4e5;padding:.6em 1em}")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>medtl evaluation: {html.escape(result['run'])}</title>
<style>{style}</style></head><body>
<h1>Evaluation of {html.escape(result['run'])}</h1>
<p class="note">{html.escape(INTENDED_USE)}</p>
<p>{html.escape(card['encoder'])} on {html.escape(result['data'])}; test set: {result['n_test_images']} images of
{result['n_test_patients']} patients (held out, never used for training or model selection).</p>
<h2>Discrimination</h2>
<p id="auc">Test AUC {_fmt_ci(result['auc']['auc'], result['auc']['auc_ci'])}, bootstrap over {html.escape(result['auc']['resampled'])}
({result['auc']['n_boot']} resamples).</p>
{op_html}
{img('roc', 'ROC curve with 95% confidence band')}{img('confusion', 'Confusion matrix at the operating point')}
<h2>Calibration</h2>
<p>Temperature {c['temperature']:.3f} fitted on validation data (validation NLL {c['val_nll_before']:.3f} →
{c['val_nll_after']:.3f}). Test ECE (15 bins) {c['test_ece_before']:.3f} before, {_fmt_ci(c['test_ece_after'], c['test_ece_after_ci'])} after.
The probabilities medtl now reports for this model are the calibrated ones.</p>
{img('reliability', 'Reliability diagram before and after temperature scaling')}
<h2>Subgroups</h2>
{'<table><tr><th>column</th><th>value</th><th>n</th><th>AUC (95% CI)</th></tr>' + ''.join(sub_rows) + '</table>' if sub_rows else '<p>No subgroup columns (site, sex, scanner) in the data.</p>'}
<h2>Training</h2>
{img('learning_curves', 'Learning curves')}
<h2>Cases and saliency</h2>
{img('cases', 'Wrong and correct test cases with Grad-CAM')}
<h3>Saliency sanity checks (Adebayo et al. 2018)</h3>
<p>Spearman rank correlation between the trained model's maps and those of progressively randomised models (cascading
from the head) and of a model trained on shuffled labels. Maps that do not change are not explanations of this model.</p>
<table><tr><th>method</th><th>cascading randomisation</th><th>data randomisation</th><th>verdict</th></tr>{''.join(rows)}</table>
<h2>Known limits</h2><ul>{''.join(f'<li>{html.escape(x)}</li>' for x in card['known_limits'])}</ul>
<p><small>medtl {html.escape(card['version'])}, {html.escape(result['date'])}</small></p>
</body></html>"""
