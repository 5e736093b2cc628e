"""DICOM files read with pydicom: modality LUT (Rescale Slope/Intercept), photometric handling.

Only de-identified header fields are kept on the :class:`Scan`; patient identifiers never
leave this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from medtl.errors import CorruptImageError, UnsupportedFormatError
from medtl.io.scan import Scan

log = logging.getLogger("medtl.io")

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
# De-identified header fields that may be shown to a user.
SAFE_FIELDS = ("Modality", "BodyPartExamined", "Manufacturer", "PhotometricInterpretation", "Rows", "Columns")


def read_dicom(path: str | Path) -> Scan:
    """Read one DICOM file (single- or multi-frame) into a :class:`Scan`.

    Raises:
        UnsupportedFormatError: the file is not DICOM or has no image.
        CorruptImageError: header and pixel data disagree, or a CT lacks its rescale.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise UnsupportedFormatError(path, "not a DICOM file (no DICM preamble or valid dataset)",
                                     "a DICOM Part 10 file") from None
    except Exception as e:  # truncated or garbled headers raise many kinds of error in pydicom
        raise CorruptImageError(path, f"DICOM header cannot be parsed ({type(e).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnsupportedFormatError(path, "DICOM file has no pixel data (not an image object)",
                                     "an image object such as CT, MR, CR or DX")
    modality = str(ds.get("Modality", "")).upper()
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedFormatError(path, f"unsupported PhotometricInterpretation {photometric!r}",
                                     ", ".join(SUPPORTED_PHOTOMETRIC))
    bits_alloc, bits_stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if bits_alloc is not None and bits_stored is not None and int(bits_stored) > int(bits_alloc):
        raise CorruptImageError(path, f"BitsStored ({bits_stored}) > BitsAllocated ({bits_alloc})")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise CorruptImageError(path, f"invalid image size Rows={rows} Columns={cols}")
    if not ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
        samples = int(ds.get("SamplesPerPixel", 1))
        expected = rows * cols * frames * samples * int(bits_alloc or 8) // 8
        if len(ds.PixelData) < expected:
            raise CorruptImageError(
                path, f"pixel data holds {len(ds.PixelData)} bytes, fewer than Rows x Columns x frames "
                f"needs ({expected})")
    if modality == "CT" and "RescaleIntercept" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        raise CorruptImageError(path, "CT image without Rescale Intercept: values cannot be put in "
                                "Hounsfield units", "a CT with RescaleSlope/RescaleIntercept")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise CorruptImageError(path, f"pixel data cannot be decoded ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")
        elif photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut
            pixels = apply_color_lut(pixels, ds)
        array = np.asarray(pixels, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        array = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        if photometric == "MONOCHROME1":
            log.warning("%s: MONOCHROME1 (white = low values) inverted to MONOCHROME2", path.name)
            array = array.max() + array.min() - array
    if not np.all(np.isfinite(array)):
        raise CorruptImageError(path, "pixel values are not all finite (NaN or infinity)")
    spacing_rc = _pixel_spacing(ds)
    if array.ndim == 3:
        spacing = (float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0), *spacing_rc)
    else:
        spacing = spacing_rc
    header = {k: _plain(ds.get(k)) for k in SAFE_FIELDS if k in ds}
    return Scan(array=array, spacing=spacing, modality=modality, source="dicom", path=path,
                units="HU" if modality == "CT" else "", header=header)


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    return 1.0, 1.0


def _plain(value):
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
