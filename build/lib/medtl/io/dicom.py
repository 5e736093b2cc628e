"""DICOM objects read with pydicom: modality LUT, VOI window, photometric handling and geometry.

Covers single-frame images, enhanced multi-frame objects (per-frame geometry and rescale from
the functional groups), Siemens mosaics (de-tiled with nibabel's CSA reader) and every
transfer syntax pydicom decodes with the installed plugins (JPEG, JPEG 2000, JPEG-LS, RLE).
Only de-identified header fields are kept on the :class:`Scan`; patient identifiers never
leave this module.
"""

from __future__ import annotations

import logging
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space

from medtl.errors import CorruptImageError, UnsupportedFormatError
from medtl.io.scan import Scan

log = logging.getLogger("medtl.io")

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT",
                         "PALETTE COLOR")
# De-identified header fields that may be shown to a user.
SAFE_FIELDS = ("Modality", "BodyPartExamined", "Manufacturer", "PhotometricInterpretation", "SeriesDescription",
               "ImageType", "Rows", "Columns", "NumberOfFrames", "BitsStored")
MAX_DECODED_BYTES = 4 << 30  # refuse headers that declare more than 4 GiB of pixels before allocating
_LPS = ("L", "P", "S")  # DICOM patient axes: +x toward the patient's left, +y posterior, +z superior
_OPPOSITE = {"L": "R", "P": "A", "S": "I"}


def open_dicom(source: str | Path | bytes, name: str | Path, header_only: bool = False,
               defer_pixels: bool = False) -> pydicom.Dataset:
    """Parse a DICOM file (a path, or its bytes from a zip) with a typed error on failure.

    ``header_only`` stops before the pixel data; ``defer_pixels`` parses everything but reads
    large values (the pixel data) from the source only when they are used.
    """
    path = Path(name)
    try:
        fp = BytesIO(source) if isinstance(source, bytes) else source
        return pydicom.dcmread(fp, stop_before_pixels=header_only, defer_size="256 KB" if defer_pixels else None)
    except InvalidDicomError:
        raise UnsupportedFormatError(path, "not a DICOM file (no DICM preamble or valid dataset)",
                                     "a DICOM Part 10 file") from None
    except Exception as e:  # truncated or garbled headers raise many kinds of error in pydicom
        raise CorruptImageError(path, f"DICOM header cannot be parsed ({type(e).__name__})") from None


def check_dataset(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse objects medtl cannot turn into trustworthy pixels, before decoding anything."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnsupportedFormatError(path, "DICOM file has no pixel data (not an image object)",
                                     "an image object such as CT, MR, CR or DX")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedFormatError(path, f"unsupported PhotometricInterpretation {photometric!r}",
                                     ", ".join(SUPPORTED_PHOTOMETRIC))
    bits_alloc, bits_stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if bits_alloc is not None and bits_stored is not None and int(bits_stored) > int(bits_alloc):
        raise CorruptImageError(path, f"BitsStored ({bits_stored}) > BitsAllocated ({bits_alloc})")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise CorruptImageError(path, f"invalid image size Rows={rows} Columns={cols} NumberOfFrames={frames}")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    declared = rows * cols * frames * samples * max(1, int(bits_alloc or 8) // 8)
    if declared > MAX_DECODED_BYTES:
        raise CorruptImageError(path, f"header declares {declared / 2**30:.1f} GiB of pixels "
                                f"({rows}x{cols}x{frames}); refused before allocating")
    if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
        if int(bits_alloc or 8) % 8 == 0 and len(ds.PixelData) < declared:
            raise CorruptImageError(
                path, f"pixel data holds {len(ds.PixelData)} bytes, fewer than Rows x Columns x frames "
                f"needs ({declared})")
    if str(ds.get("Modality", "")).upper() == "CT" and _rescale(ds, 0) is None:
        raise CorruptImageError(path, "CT image without Rescale Intercept: values cannot be put in "
                                "Hounsfield units", "a CT with RescaleSlope/RescaleIntercept")


def read_dicom(path: str | Path, data: bytes | None = None) -> Scan:
    """Read one DICOM object (single-frame, enhanced multi-frame or mosaic) into a :class:`Scan`.

    ``data`` holds the file's bytes when it comes from a zip (``path`` then only names it).

    Raises:
        UnsupportedFormatError: the file is not DICOM or has no image.
        CorruptImageError: header and pixel data disagree, or a CT lacks its rescale.
    """
    path = Path(path)
    ds = open_dicom(data if data is not None else path, path)
    return dataset_to_scan(ds, path)


def dataset_to_scan(ds: pydicom.Dataset, path: Path) -> Scan:
    """Decode a parsed dataset into a :class:`Scan` (see :func:`read_dicom`)."""
    check_dataset(ds, path)
    modality = str(ds.get("Modality", "")).upper()
    notes: list[str] = []
    array, lo_hi = decode_pixels(ds, path)
    frames = array.shape[0]
    header = {k: _plain(ds.get(k)) for k in SAFE_FIELDS if k in ds}
    window = _window(ds, 0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        lo, hi = lo_hi
        array = (lo + hi) - array
        window = None if window is None else (lo + hi - window[0], window[1])
        notes.append("MONOCHROME1 (white = low values) inverted to MONOCHROME2")
        log.info("%s: MONOCHROME1 inverted to MONOCHROME2", path.name)
    row_spacing, col_spacing = _pixel_spacing(ds, 0)
    orientation_cosines = image_orientation(ds, 0)
    positions: tuple[float, ...] = ()
    if _is_mosaic(ds):
        array, spacing, orient = _demosaic(ds, array[0], path)
        return Scan(array=array, spacing=spacing, modality=modality, source="dicom", path=path,
                    units="HU" if modality == "CT" else "", header=header, window=window, orientation=orient,
                    notes=notes + [f"Siemens mosaic de-tiled into {array.shape[0]} slices (nibabel CSA reader)"])
    if frames > 1:
        order, positions, slice_spacing = _frame_order(ds, frames, orientation_cosines, path, notes)
        array = array[order]
        spacing = (slice_spacing, row_spacing, col_spacing)
    else:
        array = array[0]
        spacing = (row_spacing, col_spacing)
    if "PixelSpacing" not in ds and "ImagerPixelSpacing" not in ds and not _shared_item(ds, "PixelMeasuresSequence"):
        notes.append("no PixelSpacing: 1 mm per pixel assumed for display only")
    if not np.all(np.isfinite(array)):
        raise CorruptImageError(path, "pixel values are not all finite (NaN or infinity)")
    orientation = orientation_letters(orientation_cosines, volume=array.ndim == 3) if orientation_cosines else ""
    return Scan(array=np.ascontiguousarray(array, dtype=np.float32), spacing=spacing, modality=modality,
                source="dicom", path=path, units="HU" if modality == "CT" else "", header=header, window=window,
                orientation=orientation, slice_positions=positions, notes=notes)


def decode_pixels(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """(frames, rows, columns) float32 values after the modality LUT, and the rescaled stored range."""
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise CorruptImageError(path, f"pixel data cannot be decoded ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or photometric == "PALETTE COLOR":
        if photometric.startswith("YBR") and photometric not in ("YBR_RCT", "YBR_ICT"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        elif photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        grey = np.asarray(pixels, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        grey = grey.reshape(frames, *grey.shape[-2:])
        return grey, (0.0, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    pixels = np.asarray(pixels).reshape(frames, int(ds.Rows), int(ds.Columns))
    out = np.empty(pixels.shape, np.float32)
    for i in range(frames):
        slope_intercept = _rescale(ds, i)
        if slope_intercept is None:
            out[i] = apply_modality_lut(pixels[i], ds)  # a Modality LUT Sequence, or no rescale at all
        else:
            out[i] = pixels[i].astype(np.float64) * slope_intercept[0] + slope_intercept[1]
    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    slope, intercept = _rescale(ds, 0) or (1.0, 0.0)
    return out, (lo * slope + intercept, hi * slope + intercept)


# -- functional groups: a value is looked up per frame, then in the shared groups, then top level --

def _shared_item(ds, sequence: str, frame: int = 0):
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        item = seq[frame] if groups.startswith("PerFrame") and frame < len(seq) else seq[0]
        if sequence in item and len(item[sequence].value):
            return item[sequence].value[0]
    return None


def _rescale(ds, frame: int) -> tuple[float, float] | None:
    item = _shared_item(ds, "PixelValueTransformationSequence", frame)
    src = item if item is not None and "RescaleIntercept" in item else ds
    if "RescaleIntercept" not in src:
        return None
    return float(src.get("RescaleSlope", 1.0) or 1.0), float(src.RescaleIntercept)


def _window(ds, frame: int) -> tuple[float, float] | None:
    item = _shared_item(ds, "FrameVOILUTSequence", frame)
    src = item if item is not None and "WindowCenter" in item else ds
    if "WindowCenter" in src and "WindowWidth" in src:
        c, w = src.WindowCenter, src.WindowWidth
        c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
        w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
        return (c, w) if w > 0 else None
    if ds.get("VOILUTSequence"):  # a non-linear VOI LUT: its input range is used as a linear window
        desc = ds.VOILUTSequence[0].LUTDescriptor
        n, first = int(desc[0] or 65536), float(desc[1])
        return first + n / 2, float(n)
    return None


def _pixel_spacing(ds, frame: int) -> tuple[float, float]:
    item = _shared_item(ds, "PixelMeasuresSequence", frame)
    for src in (item, ds):
        if src is None:
            continue
        for key in ("PixelSpacing", "ImagerPixelSpacing"):
            value = src.get(key)
            if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
                return float(value[0]), float(value[1])
    return 1.0, 1.0


def image_orientation(ds, frame: int = 0) -> tuple[float, ...] | None:
    item = _shared_item(ds, "PlaneOrientationSequence", frame)
    src = item if item is not None and "ImageOrientationPatient" in item else ds
    iop = src.get("ImageOrientationPatient")
    return tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None


def _position(ds, frame: int) -> np.ndarray | None:
    item = _shared_item(ds, "PlanePositionSequence", frame)
    src = item if item is not None and "ImagePositionPatient" in item else ds
    ipp = src.get("ImagePositionPatient")
    return np.array([float(v) for v in ipp]) if ipp is not None and len(ipp) == 3 else None


def slice_normal(iop: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))


def orientation_letters(iop: tuple[float, ...], volume: bool) -> str:
    """Patient directions of (slices,) rows and columns, e.g. "SPL" for an axial stack sorted feet to head.

    Rows run along the column cosines, columns along the row cosines, slices along their normal.
    """
    def letter(v):
        k = int(np.argmax(np.abs(v)))
        return _LPS[k] if v[k] > 0 else _OPPOSITE[_LPS[k]]

    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    letters = letter(col_dir) + letter(row_dir)
    return (letter(slice_normal(iop)) + letters) if volume else letters


def sort_along_normal(positions: list[np.ndarray], iop: tuple[float, ...], path: Path,
                      what: str) -> tuple[np.ndarray, tuple[float, ...], float]:
    """Order slices by their position along the normal; check the spacing is regular.

    Returns (order, sorted positions in mm, slice spacing). Raises CorruptImageError for
    duplicated positions or gaps (spacing varying by more than 10 %).
    """
    normal = slice_normal(iop)
    dist = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    if len(d) < 2:
        return order, tuple(d.tolist()), 1.0
    steps = np.diff(d)
    if np.any(steps < 1e-3):
        raise CorruptImageError(path, f"{what}: {int(np.sum(steps < 1e-3)) + 1} slices share a position "
                                "(several volumes, echoes or time points in one series?)",
                                "one volume per series, or pick the volume explicitly")
    spacing = float(np.median(steps))
    if np.max(np.abs(steps - spacing)) > 0.1 * spacing:
        raise CorruptImageError(path, f"{what}: irregular slice spacing (from {steps.min():.3g} to "
                                f"{steps.max():.3g} mm; missing slices?)", "evenly spaced slices")
    return order, tuple(d.tolist()), spacing


def _frame_order(ds, frames: int, iop, path: Path, notes: list[str]):
    positions = [_position(ds, i) for i in range(frames)]
    orients = [image_orientation(ds, i) for i in range(frames)]
    if iop is None or any(p is None for p in positions):
        between = float(ds.get("SpacingBetweenSlices", 0) or 0)
        notes.append(f"{frames} frames without per-frame position: kept in stored order; slice spacing "
                     + (f"{between} mm from SpacingBetweenSlices" if between > 0 else "unknown (1 mm shown)"))
        return np.arange(frames), (), between or 1.0
    if any(o is None or not np.allclose(o, iop, atol=1e-3) for o in orients):
        raise CorruptImageError(path, "frames have different orientations (a localizer or multi-plane object)",
                                "frames of one plane")
    order, pos, spacing = sort_along_normal(positions, iop, path, "frames")
    if not np.array_equal(order, np.arange(frames)):
        notes.append("frames re-ordered along the slice normal from their per-frame positions")
    return order, pos, spacing


def _is_mosaic(ds) -> bool:
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _demosaic(ds, tiled: np.ndarray, path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel warns that its DICOM readers are experimental
            from nibabel.nicom import dicomwrappers  # imported here: it warns when imported (only for mosaics)

            wrapper = dicomwrappers.wrapper_from_data(ds)
            data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (columns, rows, slices), rescale applied
            voxel = wrapper.voxel_sizes
            iop = wrapper.image_orient_patient  # (3, 2): row and column direction cosines
    except Exception as e:
        raise CorruptImageError(path, f"Siemens mosaic cannot be de-tiled ({type(e).__name__}: {_first_line(e)})",
                                "a mosaic with its CSA header (NumberOfImagesInMosaic)") from None
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    cosines = tuple(float(v) for v in np.asarray(iop).T.ravel())
    spacing = (float(voxel[2]), float(voxel[1]), float(voxel[0]))
    return array, spacing, orientation_letters(cosines, volume=True)


def _plain(value):
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, pydicom.multival.MultiValue):
        return [_plain(v) for v in value]
    return str(value)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
