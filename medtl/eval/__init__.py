"""Evaluation metrics."""

from medtl.eval.metrics import compute_auc, compute_classification_metrics

__all__ = ["compute_auc", "compute_classification_metrics"]
