"""DICOM objects read with pydicom: modality LUT, VOI window, photometric handling and geometry.

Covers single-frame images, enhanced multi-frame objects (per-frame geometry and rescale from
the functional groups), Siemens mosaics (de-tiled with nibabel's CSA reader) and every
transfer syntax pydicom decodes with the installed plugins (JPEG, JPEG 2000, JPEG-LS, RLE).
Only de-identified header fields are kept on the :class:`Scan`; patient identifiers never
leave this module.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medtl.errors import CorruptImageError, FileMissingError, MedtlInputError, UnsupportedFormatError
from medtl.io import dicom_geometry as geometry
from medtl.io.codestream import check_codestreams
from medtl.io.dicom_voi import FileVOI
from medtl.io.guard import inflate_capped, inflate_head, reading, safe_message
from medtl.io.limits import read_limits
from medtl.io.scan import Scan, is_colour, luminance

log = logging.getLogger("medtl.io")

SUPPORTED_PHOTOMETRIC = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_RCT",
    "YBR_ICT",
    "PALETTE COLOR",
)
# De-identified header fields that may be shown to a user: those medtl deid's profile (PS3.15 Basic) keeps as they
# are (SeriesDescription is not one: free text that may name the patient).
SAFE_FIELDS = (
    "Modality",
    "BodyPartExamined",
    "Manufacturer",
    "PhotometricInterpretation",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsStored",
)
CT_OUTSIDE_HU = -1100.0  # CT values below this (air is -1000 HU) are outside the field of view: padding


def open_dicom(
    source: str | Path | bytes, name: str | Path, header_only: bool = False, defer_pixels: bool = False
) -> pydicom.Dataset:
    """Parse a DICOM file (a path, or its bytes from a zip) with a typed error on failure.

    ``header_only`` stops before the pixel data; ``defer_pixels`` parses everything but reads
    large values (the pixel data) from the source only when they are used. A deflated file is
    inflated here, in pieces, never past the memory budget or past what its header declares.
    """
    path = Path(name)
    with reading(path, "DICOM header"):
        fp = BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115 -- `with fp` below
        with fp:
            try:
                preamble = pydicom.filereader.read_preamble(fp, force=True)
                meta = pydicom.filereader._read_file_meta_info(fp) if preamble is not None else None
            except InvalidDicomError:
                raise UnsupportedFormatError(
                    path, "not a DICOM file (no DICM preamble or valid dataset)", "a DICOM Part 10 file"
                ) from None
            except Exception as e:
                raise CorruptImageError(
                    path, f"DICOM file meta information cannot be parsed ({safe_message(e)})"
                ) from None
            if meta is not None and meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
                return _read_deflated(fp, meta, path, header_only)
            fp.seek(0)
            try:
                return pydicom.dcmread(
                    BytesIO(source) if isinstance(source, bytes) else source,
                    stop_before_pixels=header_only,
                    defer_size="256 KB" if defer_pixels and not isinstance(source, bytes) else None,
                )
            except InvalidDicomError:
                raise UnsupportedFormatError(
                    path, "not a DICOM file (no DICM preamble or valid dataset)", "a DICOM Part 10 file"
                ) from None
            except EOFError:
                raise CorruptImageError(path, "DICOM file ends inside its header (truncated)") from None
            except Exception as e:  # truncated or garbled headers raise many kinds of error in pydicom
                raise CorruptImageError(path, f"DICOM header cannot be parsed ({safe_message(e)})") from None


HEADER_BYTES = 16 << 20  # the most of a deflated file inflated for its header alone


def _read_deflated(fp, meta, path: Path, header_only: bool) -> pydicom.Dataset:
    """A Deflated Explicit VR Little Endian dataset, inflated with a cap (pydicom would inflate it whole)."""
    limits = read_limits()

    def declared_cap(head: bytes) -> int | None:  # the header says how much pixel data follows
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.filereader.read_dataset(
                    BytesIO(head),
                    is_implicit_VR=False,
                    is_little_endian=True,
                    stop_when=lambda tag, vr, length: tag >= 0x7FE00000,
                )
            raw, needed = declared_bytes(ds, path)
        except MedtlInputError:
            raise
        except Exception:
            return None
        limits.check(path, needed, "decoded pixels")
        return len(head) + raw + (16 << 20)

    if header_only:  # the header only: what follows it is not inflated
        body = inflate_head(fp, HEADER_BYTES)
    else:
        # a third of the budget: the stream is held, copied once into bytes, and its values copied out of it
        body = inflate_capped(fp, limits.max_bytes // 3, path, "deflated DICOM", on_first=declared_cap)
    ds = pydicom.filereader.read_dataset(
        BytesIO(body),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=(lambda tag, vr, length: tag == 0x7FE00010) if header_only else None,
    )
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # the inflated body is plain explicit VR LE
    ds.file_meta = meta
    ds.set_original_encoding(False, True)
    return ds


def declared_bytes(ds: pydicom.Dataset, path: Path) -> tuple[int, int]:
    """(stored pixel bytes, bytes needed to decode them to float32) from the header alone."""
    rows, cols = geometry.header_int(ds, "Rows", 0, path), geometry.header_int(ds, "Columns", 0, path)
    frames = geometry.header_int(ds, "NumberOfFrames", 1, path) or 1
    samples = geometry.header_int(ds, "SamplesPerPixel", 1, path) or 1
    bits_alloc = geometry.header_int(ds, "BitsAllocated", 8, path) or 8
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise CorruptImageError(path, f"invalid image size Rows={rows} Columns={cols} NumberOfFrames={frames}")
    read_limits().check_frames(path, frames)
    if samples not in (1, 3):
        raise CorruptImageError(path, f"SamplesPerPixel {samples}", "1 (grey) or 3 (colour)")
    if bits_alloc not in (1, 8, 16, 32, 64):
        raise CorruptImageError(path, f"BitsAllocated {bits_alloc}", "1, 8, 16, 32 or 64")
    n = rows * cols * frames * samples
    raw = (n + 7) // 8 if bits_alloc == 1 else n * (bits_alloc // 8)
    if str(ds.get("PhotometricInterpretation", "")).upper().strip() == "YBR_FULL_422":
        raw = raw * 2 // 3  # chroma subsampled: 2 bytes per pixel where 3 are decoded
    # decoded array + float32 copy (+ the grey conversion of colour; a palette: its 16-bit RGB, float32 RGB, grey)
    per_value = 22 if str(ds.get("PhotometricInterpretation", "")).upper().strip() == "PALETTE COLOR" else 4
    return raw, raw + max(n, 1) * per_value * (2 if samples > 1 else 1) + max(rows * cols, 1) * 8


def check_dataset(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse objects medtl cannot turn into trustworthy pixels, before decoding anything."""
    _check_has_pixel_data(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper().strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        shown = f" {photometric!r}" if re.fullmatch(r"[A-Z0-9_ ]{1,16}", photometric) else ""  # a code, not a name
        raise UnsupportedFormatError(
            path, f"unsupported PhotometricInterpretation{shown}", ", ".join(SUPPORTED_PHOTOMETRIC)
        )
    ts = getattr(ds.get("file_meta"), "get", lambda k: None)("TransferSyntaxUID")
    if ts is None or not pydicom.uid.UID(str(ts)).is_transfer_syntax:
        shown = str(ts)[:64] if ts is not None and pydicom.uid.UID(str(ts)).is_valid else "missing or not a UID"
        raise UnsupportedFormatError(
            path, f"transfer syntax {shown} is not one medtl can decode", "a DICOM standard transfer syntax"
        )
    bits_alloc = geometry.header_int(ds, "BitsAllocated", 8, path)
    bits_stored = geometry.header_int(ds, "BitsStored", 0, path)
    if bits_stored and not 0 < bits_stored <= bits_alloc:
        raise CorruptImageError(path, f"BitsStored ({bits_stored}) not within BitsAllocated ({bits_alloc})")
    samples = geometry.header_int(ds, "SamplesPerPixel", 1, path)
    if (samples == 1) != (photometric.startswith("MONOCHROME") or photometric == "PALETTE COLOR"):
        raise CorruptImageError(path, f"SamplesPerPixel {samples} does not fit PhotometricInterpretation {photometric}")
    if photometric == "PALETTE COLOR" and not all(
        f"{c}PaletteColorLookupTableDescriptor" in ds for c in ("Red", "Green", "Blue")
    ):
        raise CorruptImageError(path, "PALETTE COLOR image without its palette lookup tables")
    raw, needed = declared_bytes(ds, path)
    read_limits().check(
        path,
        needed,
        f"decoding {geometry.header_int(ds, 'Rows', 0, path)}x{geometry.header_int(ds, 'Columns', 0, path)}"
        f"x{geometry.header_int(ds, 'NumberOfFrames', 1, path) or 1} pixels",
    )
    if "PixelData" in ds:
        length = _stored_length(ds, "PixelData")
        if length == 0:
            raise CorruptImageError(path, "pixel data element is empty")
        if length != 0xFFFFFFFF:  # (undefined: encapsulated fragments)
            read_limits().check(path, length, "the pixel data element")
        if not pydicom.uid.UID(str(ts)).is_compressed and length < raw:
            raise CorruptImageError(
                path, f"pixel data holds {length} bytes, fewer than Rows x Columns x frames needs ({raw})"
            )
    if str(ds.get("Modality", "")).upper() == "CT" and geometry.rescale(ds, 0, path) is None:
        raise CorruptImageError(
            path,
            "CT image without Rescale Intercept: values cannot be put in Hounsfield units",
            "a CT with RescaleSlope/RescaleIntercept",
        )


def _check_has_pixel_data(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse a dataset without pixel data: a truncated image file, or an object that is no image."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = str(
            ds.get("SOPClassUID", "")
            or getattr(ds.get("file_meta"), "get", lambda k: "")("MediaStorageSOPClassUID")
            or ""
        )
        if "Image Storage" in pydicom.uid.UID(sop).name or "Rows" in ds or not sop:
            raise CorruptImageError(
                path, "DICOM file ends before its pixel data (truncated or damaged)", "a complete DICOM image file"
            )
        raise UnsupportedFormatError(
            path, "DICOM file has no pixel data (not an image object)", "an image object such as CT, MR, CR or DX"
        )


def _stored_length(ds: pydicom.Dataset, key: str) -> int:
    """An element's length in bytes, without reading a deferred value from the file."""
    elem = ds.get_item(key)
    if isinstance(elem, pydicom.dataelem.RawDataElement):
        if elem.value is None:  # deferred: the length from the element's header
            return int(elem.length)
        return len(elem.value)
    value = elem.value
    return 0 if value is None else len(value)


def read_dicom(path: str | Path, data: bytes | None = None) -> Scan:
    """Read one DICOM object (single-frame, enhanced multi-frame or mosaic) into a :class:`Scan`.

    ``data`` holds the file's bytes when it comes from a zip (``path`` then only names it).

    Raises:
        UnsupportedFormatError: the file is not DICOM or has no image.
        CorruptImageError: header and pixel data disagree, or a CT lacks its rescale.
        InputTooLargeError: decoding it would pass the memory budget (:mod:`medtl.io.limits`).
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise FileMissingError(path, "file not found" if not path.exists() else "not a regular file")
    ds = open_dicom(data if data is not None else path, path, defer_pixels=True)  # pixels read after the checks
    return dataset_to_scan(ds, path)


def study_key(ds) -> str:
    """A short key telling a file's study apart from others: a hash of its StudyInstanceUID (the UID itself
    can be traced back to the patient); "" when the file names no study."""
    uid = str(ds.get("StudyInstanceUID", "") or "")
    return hashlib.sha256(uid.encode()).hexdigest()[:10] if uid else ""


def patient_key(ds) -> str:
    """A short key telling a file's patient apart from others (a hash of PatientID and PatientName, which it does
    not reveal); "" when the file names neither."""
    try:
        who = f"{ds.get('PatientID', '') or ''}\x00{ds.get('PatientName', '') or ''}"
    except Exception:  # a damaged element: no key (the file's reading says what is wrong, not this)
        return ""
    return hashlib.sha256(who.encode("utf-8", "replace")).hexdigest()[:10] if who != "\x00" else ""


def dataset_to_scan(ds: pydicom.Dataset, path: Path) -> Scan:
    """Decode a parsed dataset into a :class:`Scan` (see :func:`read_dicom`)."""
    with reading(path, "DICOM image"):
        return _dataset_to_scan(ds, path)


def _dataset_to_scan(ds: pydicom.Dataset, path: Path) -> Scan:
    """Check and decode a dataset, then put its frames in order with their geometry (see :func:`read_dicom`)."""
    check_dataset(ds, path)
    modality = str(ds.get("Modality", "")).upper()
    notes: list[str] = []
    array, lo_hi, padding = decode_pixels(ds, path)
    frames = array.shape[0]
    array, rgb = _split_colour(array)
    header = _safe_header(ds)
    window = geometry.window(ds, 0, path)
    voi = FileVOI.from_dataset(ds, path)
    if padding is not None:
        notes.append(
            f"{int(padding.sum())} padding pixels (PixelPaddingValue, or CT values below "
            f"{CT_OUTSIDE_HU:g} HU) set to the background"
        )
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        array, window = _invert_monochrome1(array, lo_hi, window, voi, path, notes)
    row_spacing, col_spacing = geometry.pixel_spacing(ds, 0, path)
    orientation_cosines = geometry.image_orientation(ds, 0, path)
    if geometry.is_mosaic(ds) and frames == 1:
        return _mosaic_scan(ds, array[0], path, modality, header, window, notes)
    positions: tuple[float, ...] = ()
    spacing: tuple[float, ...]
    if frames > 1:
        order, positions, slice_spacing = geometry.frame_order(ds, frames, orientation_cosines, path, notes)
        spacing = (slice_spacing, row_spacing, col_spacing)
    else:
        order, spacing = 0, (row_spacing, col_spacing)
    array, padding, rgb = _take_frames(order, array, padding, rgb)
    if not _has_pixel_spacing(ds):
        notes.append("no PixelSpacing: 1 mm per pixel assumed for display only")
    if not np.all(np.isfinite(array)):
        raise CorruptImageError(path, "pixel values are not all finite (NaN or infinity)")
    orientation = (
        geometry.orientation_letters(orientation_cosines, volume=array.ndim == 3) if orientation_cosines else ""
    )
    return Scan(
        array=np.ascontiguousarray(array, dtype=np.float32),
        spacing=spacing,
        modality=modality,
        source="dicom",
        path=path,
        units="HU" if modality == "CT" else "",
        header=header,
        window=window,
        orientation=orientation,
        slice_positions=positions,
        notes=notes,
        voi=voi,
        padding=padding,
        rgb=rgb,
        value_max=lo_hi[1] if rgb is not None else None,
    )


def _split_colour(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey values, RGB or None) of decoded pixels: a colour image's luminance, and its RGB unless it is grey."""
    if array.ndim != 4:
        return array, None
    rgb = array  # colour: (frames, rows, columns, 3), decoded to RGB once by pydicom
    return luminance(rgb), rgb if is_colour(rgb) else None


def _safe_header(ds: pydicom.Dataset) -> dict:
    """The :data:`SAFE_FIELDS` a dataset holds, and its :func:`study_key` when it names a study."""
    header = {k: geometry.plain_value(ds.get(k)) for k in SAFE_FIELDS if k in ds}
    if study_key(ds):
        header["study_key"] = study_key(ds)
    return header


def _invert_monochrome1(
    array: np.ndarray,
    lo_hi: tuple[float, float],
    window: tuple[float, float] | None,
    voi: FileVOI | None,
    path: Path,
    notes: list[str],
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(values, window) of a MONOCHROME1 image mirrored across its stored range, so that white = high values."""
    lo, hi = lo_hi
    array = (lo + hi) - array
    window = None if window is None else (lo + hi - window[0], window[1])
    if voi is not None:
        voi.mirror = lo + hi
    notes.append("MONOCHROME1 (white = low values) inverted to MONOCHROME2")
    log.info("%s: MONOCHROME1 inverted to MONOCHROME2", path.name)
    return array, window


def _mosaic_scan(
    ds: pydicom.Dataset,
    tiled: np.ndarray,
    path: Path,
    modality: str,
    header: dict,
    window: tuple[float, float] | None,
    notes: list[str],
) -> Scan:
    """The :class:`Scan` of a Siemens mosaic: its one tiled frame de-tiled into a volume (nibabel's CSA reader)."""
    array, spacing, orient = geometry.demosaic(ds, tiled, path)
    return Scan(
        array=array,
        spacing=spacing,
        modality=modality,
        source="dicom",
        path=path,
        units="HU" if modality == "CT" else "",
        header=header,
        window=window,
        orientation=orient,
        notes=notes + [f"Siemens mosaic de-tiled into {array.shape[0]} slices (nibabel CSA reader)"],
    )


def _take_frames(
    index, array: np.ndarray, padding: np.ndarray | None, rgb: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The frames at ``index`` (one frame's number, or the order of all frames) of the values, padding and colour."""
    return array[index], None if padding is None else padding[index], None if rgb is None else rgb[index]


def _has_pixel_spacing(ds: pydicom.Dataset) -> bool:
    """Whether the dataset gives its pixel spacing (PixelSpacing, ImagerPixelSpacing or a PixelMeasuresSequence)."""
    return bool("PixelSpacing" in ds or "ImagerPixelSpacing" in ds or geometry.shared_item(ds, "PixelMeasuresSequence"))


def decode_pixels(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, tuple[float, float], np.ndarray | None]:
    """(frames, rows, columns) float32 values after the modality LUT, the rescaled stored range, and
    the padding mask (True where PixelPaddingValue marks no image), or None.

    Colour is decoded once: pydicom returns RGB for every colour photometric interpretation
    (YBR_* included); a colour image comes back as (frames, rows, columns, 3) RGB.
    """
    frames = geometry.header_int(ds, "NumberOfFrames", 1, path) or 1
    rows, cols = geometry.header_int(ds, "Rows", 0, path), geometry.header_int(ds, "Columns", 0, path)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = geometry.header_int(ds, "SamplesPerPixel", 1, path)
    check_codestreams(ds, path, frames, rows, cols, samples)  # a decoder allocates what its codestream says
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise CorruptImageError(path, f"pixel data cannot be decoded ({safe_message(e)})") from None
    expected = (frames, rows, cols, samples)
    if int(np.prod(pixels.shape)) != int(np.prod(expected)):
        raise CorruptImageError(
            path, f"decoded pixels have shape {pixels.shape}, not the {expected} the header declares"
        )
    if samples > 1 or photometric == "PALETTE COLOR":
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        rgb = np.asarray(pixels).reshape(frames, rows, cols, 3).astype(np.float32)
        return rgb, (0.0, _colour_max(ds, rgb, path)), None
    pixels = np.asarray(pixels).reshape(frames, rows, cols)
    padding = _padding_mask(ds, pixels, path)
    out = np.empty(pixels.shape, np.float32)
    for i in range(frames):
        slope_intercept = geometry.rescale(ds, i, path)
        if slope_intercept is None:
            out[i] = apply_modality_lut(pixels[i], ds)  # a Modality LUT Sequence, or no rescale at all
        else:
            out[i] = pixels[i].astype(np.float64) * slope_intercept[0] + slope_intercept[1]
    bits = geometry.header_int(ds, "BitsStored", 16, path) or 16
    signed = geometry.header_int(ds, "PixelRepresentation", 0, path) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = geometry.rescale(ds, 0, path) or (1.0, 0.0)
    if str(ds.get("Modality", "")).upper() == "CT" and slope_intercept_all(ds, frames, path):
        below_air = out < CT_OUTSIDE_HU  # no tissue is below air (-1000 HU): outside the field of view
        if below_air.any():
            padding = below_air if padding is None else (padding | below_air)
    if padding is not None:
        if padding.all():
            raise CorruptImageError(path, "every pixel is padding (PixelPaddingValue): no image")
        out[padding] = out[~padding].min()  # background in every window, and out of the statistics
    return out, (lo * slope + intercept, hi * slope + intercept), padding


def slope_intercept_all(ds, frames: int, path: Path) -> bool:
    """Whether every frame's values are put in HU by a rescale (not by a Modality LUT table)."""
    return all(geometry.rescale(ds, i, path) is not None for i in range(frames))


def _colour_max(ds, rgb: np.ndarray, path: Path) -> float:
    """Full scale of a colour image: its stored bits' range (a palette's entries: their bit depth)."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(desc[2]) if desc is not None and len(desc) == 3 else 16
        return float(2 ** (8 if bits == 8 or float(rgb.max(initial=0)) < 256 else 16) - 1)
    return float(2 ** (geometry.header_int(ds, "BitsStored", 8, path) or 8) - 1)


def _padding_mask(ds, pixels: np.ndarray, path: Path) -> np.ndarray | None:
    """Pixels whose stored value is PixelPaddingValue (up to PixelPaddingRangeLimit), or None."""
    if "PixelPaddingValue" not in ds:
        return None

    def stored(key):
        value = ds[key].value
        if isinstance(value, bytes):  # ambiguous "US or SS" left undecoded
            signed = geometry.header_int(ds, "PixelRepresentation", 0, path) == 1
            return int.from_bytes(value[:2], "little", signed=signed) if len(value) >= 2 else None
        try:
            return int(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
        except (TypeError, ValueError, IndexError):
            raise CorruptImageError(path, f"{key} is not a whole number") from None

    first = stored("PixelPaddingValue")
    if first is None:
        return None
    last = stored("PixelPaddingRangeLimit") if "PixelPaddingRangeLimit" in ds else first
    lo, hi = min(first, last if last is not None else first), max(first, last if last is not None else first)
    mask = (pixels >= lo) & (pixels <= hi)
    return mask if mask.any() else None
