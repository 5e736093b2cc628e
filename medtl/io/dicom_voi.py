"""A DICOM file's own non-linear VOI transform (a VOI LUT table, or a SIGMOID / LINEAR_EXACT window), kept
with a scan so that display and preprocessing can apply it as the file asks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_voi_lut

from medtl.errors import CorruptImageError
from medtl.io import dicom_geometry as geometry


class FileVOI:
    """The file's own non-linear VOI transform (a VOI LUT table, or a SIGMOID / LINEAR_EXACT window),
    applied with :func:`pydicom.pixels.apply_voi_lut` to values after the modality LUT.

    Keeps only the VOI module and the fields that fix its output range (no identifiers).
    ``mirror`` is set for MONOCHROME1 images, whose array medtl stores inverted.
    """

    _KEYS = (
        "VOILUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
    )

    def __init__(self, ds: pydicom.Dataset, y_range: tuple[float, float]):
        self.dataset = ds
        self.y_range = y_range
        self.mirror: float | None = None

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset, path: Path) -> FileVOI | None:
        """The VOI transform ``ds`` asks for, or None when it has only a linear window (or none)."""
        lut = ds.get("VOILUTSequence")
        has_lut = bool(lut) and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper().strip()
        if not has_lut and not (function in ("SIGMOID", "LINEAR_EXACT") and geometry.window(ds, 0, path) is not None):
            return None
        small = pydicom.Dataset()
        for key in cls._KEYS:
            if key in ds:
                small[key] = ds[key]
        small.PhotometricInterpretation = "MONOCHROME2"
        small.BitsStored = geometry.header_int(ds, "BitsStored", 16, path) or 16
        small.PixelRepresentation = geometry.header_int(ds, "PixelRepresentation", 0, path)
        if has_lut:
            table = np.asarray(apply_voi_lut(np.arange(1, dtype=np.float64), small))  # validates the table
            data = np.asarray(lut[0].LUTData, dtype=np.float64).ravel()
            if data.size == 0 or table.size == 0:
                raise CorruptImageError(path, "VOI LUT Sequence has an empty table")
            y = (float(data.min()), float(data.max()))
        else:
            bits, signed = small.BitsStored, small.PixelRepresentation == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            slope_intercept = geometry.rescale(ds, 0, path)
            if slope_intercept is not None:
                slope, intercept = slope_intercept
                small.RescaleSlope, small.RescaleIntercept = slope, intercept
                lo, hi = lo * slope + intercept, hi * slope + intercept
            y = (float(min(lo, hi)), float(max(lo, hi)))
        return cls(small, y)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``values`` (as stored on the Scan) → the file's VOI output scaled to [0, 1], white = high."""
        original = values if self.mirror is None else self.mirror - values
        out = np.asarray(apply_voi_lut(np.asarray(original, np.float64), self.dataset), np.float64)
        lo, hi = self.y_range
        out = np.clip((out - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
        return (1.0 - out if self.mirror is not None else out).astype(np.float32)
