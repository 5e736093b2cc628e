"""Saliency maps and overlays."""

from medtl.explain.saliency import compute_gradcam, create_overlay

__all__ = ["compute_gradcam", "create_overlay"]
