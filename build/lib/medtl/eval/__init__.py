"""Evaluation: metrics with patient-level bootstrap intervals, operating points, calibration."""

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

__all__ = ["compute_auc", "compute_auc_ci", "compute_classification_metrics", "compute_binary_metrics",
           "choose_threshold", "aggregate_by_group", "bootstrap_ci", "compute_ece", "compute_nll", "fit_temperature",
           "reliability_curve"]
