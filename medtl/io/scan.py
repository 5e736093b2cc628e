"""The in-memory form of one image file, whatever format it came in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Scan:
    """Pixels and the geometry/metadata needed to preprocess and display them.

    ``array`` is float32 in display orientation: ``(rows, columns)`` for a 2D image or
    ``(slices, rows, columns)`` for a volume, with rows running top to bottom and columns left
    to right as a radiologist views an axial image. CT values are Hounsfield units.
    """

    array: np.ndarray  # float32 pixel values (HU for CT) in display orientation
    spacing: tuple[float, ...]  # mm per pixel along each axis of ``array`` (1.0 where unknown)
    modality: str  # DICOM modality ("CT", "MR", "CR", "DX", ...) or "" when the format has none
    source: str  # "dicom", "nifti" or "image"
    path: Path  # the file read
    units: str = ""  # "HU" for CT after rescale, else ""
    header: dict = field(default_factory=dict)  # de-identified summary (no patient identifiers)

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3 and self.array.shape[0] > 1

    def summary(self) -> dict:
        """A de-identified description for ``medtl info`` and the UI."""
        finite = self.array[np.isfinite(self.array)]
        return {
            "file": self.path.name,
            "format": self.source,
            "modality": self.modality or "unknown",
            "shape": list(self.array.shape),
            "spacing_mm": [round(float(s), 4) for s in self.spacing],
            "value_range": [float(finite.min()), float(finite.max())] if finite.size else None,
            "units": self.units or "arbitrary",
            **self.header,
        }
