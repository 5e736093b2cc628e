"""Saliency maps, overlays and their sanity checks."""

from medtl.explain.saliency import METHODS, add_legend, compute_gradcam, compute_saliency, create_overlay
from medtl.explain.sanity import SanityResult, run_sanity_checks

__all__ = ["METHODS", "compute_gradcam", "compute_saliency", "create_overlay", "add_legend", "run_sanity_checks",
           "SanityResult"]
