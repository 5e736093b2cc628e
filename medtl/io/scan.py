"""The in-memory form of one image file or series, whatever format it came in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Scan:
    """Pixels and the geometry/metadata needed to preprocess and display them.

    ``array`` is float32 in display orientation: ``(rows, columns)`` for a 2D image or
    ``(slices, rows, columns)`` for a volume, with rows running top to bottom and columns left
    to right as a radiologist views the image, and slices sorted along the slice normal.
    CT values are Hounsfield units.
    """

    array: np.ndarray  # float32 pixel values (HU for CT) in display orientation
    spacing: tuple[float, ...]  # mm per pixel along each axis of ``array`` (see ``notes`` where unknown)
    modality: str  # DICOM modality ("CT", "MR", "CR", "DX", ...) or "" when the format has none
    source: str  # "dicom", "dicom-series", "nifti", "image" or "array"
    path: Path  # the file, folder or zip read
    units: str = ""  # "HU" for CT after rescale, else ""
    header: dict = field(default_factory=dict)  # de-identified summary (no patient identifiers)
    window: tuple[float, float] | None = None  # (center, width) from the file's VOI module, in ``array`` units
    orientation: str = ""  # direction of rows/columns/slices, e.g. "RAS" or "LPS" letters; "" when unknown
    value_max: float | None = None  # full-scale value of the stored type (255 for 8-bit pictures), for "dtype" scaling
    slice_positions: tuple[float, ...] = ()  # mm along the slice normal of each slice (volumes from DICOM)
    notes: list[str] = field(default_factory=list)  # what could not be trusted or was decided while reading
    voi: object | None = None  # the file's non-linear VOI (medtl.io.dicom_voi.FileVOI: a LUT table or SIGMOID), or None
    padding: np.ndarray | None = None  # True where the file marks no image (PixelPaddingValue), same shape as array
    rgb: np.ndarray | None = None  # float32 colour of a colour source, array's shape + (3,); ``array`` is its luminance

    @property
    def is_colour(self) -> bool:
        return self.rgb is not None

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3 and self.array.shape[0] > 1

    def summary(self) -> dict:
        """A de-identified description for ``medtl info`` and the UI."""
        real = self.array if self.padding is None else self.array[~self.padding]
        finite = real[np.isfinite(real)]
        out: dict[str, Any] = {
            "file": self.path.name,
            "format": self.source,
            "modality": self.modality or "unknown",
            "shape": list(self.array.shape),
            "spacing_mm": [round(float(s), 4) for s in self.spacing],
            "orientation": self.orientation or "unknown",
            "value_range": [round(float(finite.min()), 3), round(float(finite.max()), 3)] if finite.size else None,
            "units": self.units or "arbitrary",
            "colour": "RGB" if self.rgb is not None else "grey",
        }
        if self.window is not None:
            out["file_window"] = {"center": round(self.window[0], 2), "width": round(self.window[1], 2)}
        out.update(self.header)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luminance weights


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey values of an (..., 3) RGB array."""
    return np.asarray(rgb, np.float32) @ LUMA


def is_colour(rgb: np.ndarray, tolerance: float = 0.5) -> bool:
    """Whether an (..., 3) array holds colour (not grey stored in three equal channels)."""
    rgb = np.asarray(rgb)
    return bool(
        np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0) > tolerance
        or np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0) > tolerance
    )
