"""Evaluation of a run: ``medtl evaluate`` (:func:`evaluate_run`: AUC with patient-bootstrap intervals,
calibration, operating point, subgroups, saliency sanity checks, a data-randomisation test), its figures,
its model card and report.

The metrics themselves are pure arithmetic in :mod:`medtl.metrics` (training's validation uses them too);
their names are re-exported here. The evaluation of a run builds on training and is imported on first use,
so importing the metrics does not import the training loop.
"""

import importlib

from medtl.metrics import (
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
    seed_mean_ci,
)

_LATER = {
    "evaluate_run": "evaluate",
    "compute_evaluation": "evaluate",
    "Evaluation": "evaluate",
    "write_evaluation": "evaluate",
    "evaluation_figures": "figures",
    "save_study": "figures",
    "model_card": "card",
    "model_card_markdown": "card",
    "report_html": "card",
    "INTENDED_USE": "card",
    "run_sanity_checks": "sanity",
    "SanityResult": "sanity",
    "rank_correlation": "sanity",
}

__all__ = [
    "compute_auc",
    "compute_auc_ci",
    "compute_classification_metrics",
    "compute_binary_metrics",
    "choose_threshold",
    "aggregate_by_group",
    "bootstrap_ci",
    "compute_ece",
    "compute_nll",
    "fit_temperature",
    "reliability_curve",
    "seed_mean_ci",
    *_LATER,
]


def __getattr__(name: str):
    if name in _LATER:
        return getattr(importlib.import_module(f"medtl.eval.{_LATER[name]}"), name)
    raise AttributeError(f"module 'medtl.eval' has no attribute {name!r}")
