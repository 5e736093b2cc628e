"""Saliency maps, overlays and their sanity checks."""

from medtl.explain.saliency import (
    METHODS,
    add_legend,
    compute_gradcam,
    compute_integrated_gradients,
    compute_occlusion,
    compute_saliency,
    create_overlay,
    explain_input,
    integrated_gradients,
    integrated_gradients_with_delta,
    normalize_map,
)

__all__ = [
    "METHODS",
    "compute_gradcam",
    "compute_occlusion",
    "compute_integrated_gradients",
    "integrated_gradients",
    "integrated_gradients_with_delta",
    "compute_saliency",
    "explain_input",
    "normalize_map",
    "create_overlay",
    "add_legend",
]
