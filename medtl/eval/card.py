"""The model card and the self-contained HTML report, rendered from an evaluation's record with the
Jinja templates in ``templates/``."""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from medtl.data.manifest import label_counts
from medtl.run import RunDir, SavedRun
from medtl.version import __version__

INTENDED_USE = (
    "Research on transfer learning for medical image classification. Not a medical device: "
    "not for diagnosis, triage or any clinical decision."
)


def model_card(run: RunDir, result: dict, prepared, cfg, saved: SavedRun) -> dict:
    """The model card of an evaluated run (``result``: the evaluation's record): intended use, training data,
    how it was trained, test metrics with intervals, calibration, refusal, saliency checks and known limits."""
    metrics = run.read_json(RunDir.METRICS, {})
    m = prepared.manifest
    limits = [
        f"Test set of {result['n_test_images']} images from {result['n_test_patients']} patients: intervals "
        "are wide; confirm on data from your own site before any use."
    ]
    if m.kind == "medmnist":
        limits.append("Trained on MedMNIST images (28 px originals, upscaled): far below clinical resolution.")
    if not result.get("subgroups"):
        limits.append("No site, sex or scanner columns: performance across subgroups is unknown.")
    cal = result["calibration"]
    if cal["test_ece_after"] > cal["test_ece_before"]:
        limits.append(
            f"Temperature scaling fitted on {sum(len(p) for n, p in prepared.sets.items() if n == 'val')} "
            f"validation images raised the test ECE ({cal['test_ece_before']:.3f} → "
            f"{cal['test_ece_after']:.3f}): the validation set is too small to calibrate reliably."
        )
    for s in result.get("saliency_sanity", []):
        if not s["passed"]:
            limits.append(f"Saliency method {s['method']} failed its randomisation sanity check: do not rely on it.")
    unchecked = result.get("saliency_sanity_scope", {}).get("not_checked")
    if unchecked:
        limits.append(f"Saliency maps not checked for this model: {', '.join(unchecked)}; read them with care.")
    counts = {name: label_counts([s["label"] for s in part], m.class_names) for name, part in prepared.sets.items()}
    return {
        "model": run.name,
        "encoder": saved.encoder,
        "version": __version__,
        "date": result["date"],
        "intended_use": INTENDED_USE,
        "training_data": {
            "source": Path(cfg.data.path).name,
            "kind": m.kind,
            "split": prepared.split_source,
            "label_counts": counts,
            "patients": {n: len({s["patient_id"] for s in p}) for n, p in prepared.sets.items()},
        },
        "training": {
            "strategy": metrics.get("strategy", cfg.train.strategy),
            "strategy_reason": metrics.get("strategy_reason", ""),
            "input_size": saved.preprocessing.input_size,
            "pretrained": cfg.encoder.pretrained,
        },
        "metrics": {
            "test_auc": result["auc"]["auc"],
            "test_auc_95ci": result["auc"]["auc_ci"],
            "operating_point": result.get("operating_point"),
            "per_label": result.get("per_label"),
        },
        "calibration": result["calibration"],
        "ood": {k: v for k, v in result.get("ood", {}).items() if k != "foreign"},
        "saliency": [{"method": s["method"], "passed": s["passed"]} for s in result.get("saliency_sanity", [])],
        "known_limits": limits,
    }


def _fmt_ci(v, ci, digits=3) -> str:
    """``0.912 (95% CI 0.871–0.950)``, or ``n/a``."""
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" + (f" (95% CI {ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("medtl.eval", "templates"),
    autoescape=jinja2.select_autoescape(["html.j2"]),
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters["ci"] = lambda v, ci=None: _fmt_ci(v, ci)


def model_card_markdown(card: dict) -> str:
    """The model card as Markdown (template ``templates/model_card.md.j2``)."""
    return _TEMPLATES.get_template("model_card.md.j2").render(card=card)


def report_html(result: dict, card: dict, figures: dict[str, bytes]) -> str:
    """The self-contained HTML report (template ``templates/report.html.j2``; figures embedded)."""
    encoded = {name: base64.b64encode(png).decode() for name, png in figures.items()}
    return _TEMPLATES.get_template("report.html.j2").render(
        result=result, card=card, figures=encoded, intended_use=INTENDED_USE
    )


__all__ = ["model_card", "model_card_markdown", "report_html", "INTENDED_USE"]
