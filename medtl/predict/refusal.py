"""Refusal: whether a model should answer for a scan at all, judged from its header and pixels against
what the model was trained on (the run's input record)."""

from __future__ import annotations

import numpy as np

from medtl.io import Scan


def input_refusal(record: dict, scan: Scan) -> str | None:
    """Why a model trained on the inputs described by ``record`` (a run's ``input_record``) should not
    answer for ``scan``, judged from its header and pixels; None when nothing speaks against it.

    Refused: a blank image; a colour image for a model trained on grey images only (or a grey one for a
    colour-only model); a modality or a dimensionality the model never saw; an image much smaller than
    any training image (under half the smallest side seen, or under 8 pixels).
    """
    a = scan.array
    finite = a[np.isfinite(a)]
    if finite.size == 0 or np.ptp(finite) == 0 or finite.std() < 1e-6 * max(1.0, abs(finite).max()):
        return "the image is blank (one value everywhere)"
    if scan.rgb is not None and not record.get("colour_inputs") and _is_colour_photo(scan.rgb):
        return "this is a colour image, and the model was trained on grey images only"
    if scan.rgb is None and record.get("colour_inputs") and record.get("grey_inputs") == 0:
        return "this is a grey image, and the model was trained on colour images only"
    seen = [m for m in record.get("modalities", []) if m not in ("UNKNOWN", "")]
    if seen and scan.modality and scan.modality.upper() not in seen:
        return f"the model was trained on {', '.join(seen)} images, and this is {scan.modality}"
    dims = record.get("dimensions", [])
    ndim = 3 if scan.is_volume else 2
    if dims and ndim not in dims:
        return (
            f"the model was trained on {'volumes' if 3 in dims else '2D images'} only, and this is a "
            f"{'volume' if ndim == 3 else '2D image'}"
        )
    side = int(min(a.shape[-2:]))
    smallest = record.get("min_side")
    if side < 8 or (smallest and side < smallest / 2):
        return (
            f"the image is {a.shape[-2]}×{a.shape[-1]} pixels, far smaller than the training images "
            f"(at least {smallest} pixels a side)"
            if smallest
            else f"the image is {a.shape[-2]}×{a.shape[-1]} pixels: too small to judge"
        )
    return None


def _is_colour_photo(rgb: np.ndarray) -> bool:
    """Whether an (…, 3) RGB image is clearly coloured (a tenth of its pixels saturated)."""
    rgb = np.asarray(rgb, np.float32)
    top = max(float(rgb.max(initial=0)), 1.0)
    saturation = (rgb.max(axis=-1) - rgb.min(axis=-1)) * (255.0 / top)
    return float(np.mean(saturation > 40)) > 0.1


UNLIKE_TRAINING = (
    "it does not look like the images the model was trained on (its features lie outside "
    "what {pct} of the validation images reached)"
)


__all__ = ["input_refusal", "UNLIKE_TRAINING"]
