"""Evaluation: metrics with patient-level bootstrap intervals, operating points, calibration, and the
run evaluation behind ``medtl evaluate`` (report, model card).

The metrics are pure arithmetic on arrays (training's validation uses them too); the evaluation of
a run (``evaluate_run`` and its parts, in :mod:`medtl.eval.report`) builds on training and is
imported on first use, so importing the metrics does not import the training loop.
"""

import importlib

from medtl.eval.metrics import (
    aggregate_by_group,
    bootstrap_ci,
    choose_threshold,
    compute_auc,
    compute_auc_ci,
    compute_binary_metrics,
    compute_classification_metrics,
    compute_ece,
    compute_nll,
    fit_temperature,
    reliability_curve,
)

_REPORT = ("evaluate_run", "compute_evaluation", "Evaluation", "evaluation_figures", "model_card",
           "model_card_markdown", "report_html", "seed_mean_ci", "save_study", "INTENDED_USE")

__all__ = ["compute_auc", "compute_auc_ci", "compute_classification_metrics", "compute_binary_metrics",
           "choose_threshold", "aggregate_by_group", "bootstrap_ci", "compute_ece", "compute_nll", "fit_temperature",
           "reliability_curve", *_REPORT]


def __getattr__(name: str):
    if name in _REPORT:
        return getattr(importlib.import_module("medtl.eval.report"), name)
    raise AttributeError(f"module 'medtl.eval' has no attribute {name!r}")
