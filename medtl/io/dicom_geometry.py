"""Numeric attributes of a DICOM dataset, frame by frame: functional groups (a value is looked up per frame,
then in the shared groups, then at the top level), rescale and window, pixel spacing, orientation and
position; the order of frames along the slice normal; Siemens mosaics de-tiled (nibabel's CSA reader)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom

from medtl.errors import CorruptImageError
from medtl.io.guard import safe_message

LPS = ("L", "P", "S")  # DICOM patient axes: +x toward the patient's left, +y posterior, +z superior


OPPOSITE = {"L": "R", "P": "A", "S": "I"}


def shared_item(ds, sequence: str, frame: int = 0):
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        item = seq[frame] if groups.startswith("PerFrame") and frame < len(seq) else seq[0]
        if sequence in item and len(item[sequence].value):
            return item[sequence].value[0]
    return None


def header_int(ds, key: str, default: int, path: Path) -> int:
    """A header value as a whole number (``default`` when absent or empty), or a typed error naming the field."""
    value = ds.get(key, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise CorruptImageError(path, f"{key} is not a whole number") from None


def numbers(value, key: str, path: Path | None, count: int | None = None) -> list[float]:
    """A header value as finite floats (``count`` of them, when given), or a typed error naming the field."""
    items = list(value) if isinstance(value, (pydicom.multival.MultiValue, list, tuple)) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError, OverflowError):
        raise CorruptImageError(path, f"{key} is not numeric") from None
    if (count is not None and len(out) != count) or not all(np.isfinite(out)):
        raise CorruptImageError(path, f"{key} is not {count or 'a'} finite number{'s' if count != 1 else ''}")
    return out


def rescale(ds, frame: int, path: Path | None = None) -> tuple[float, float] | None:
    item = shared_item(ds, "PixelValueTransformationSequence", frame)
    src = item if item is not None and "RescaleIntercept" in item else ds
    if "RescaleIntercept" not in src:
        return None
    intercept = numbers(src.RescaleIntercept, "RescaleIntercept", path, 1)[0]
    slope = src.get("RescaleSlope", 1.0)
    slope = numbers(slope, "RescaleSlope", path, 1)[0] if slope not in (None, "") else 1.0
    return slope or 1.0, intercept


def window(ds, frame: int, path: Path | None = None) -> tuple[float, float] | None:
    item = shared_item(ds, "FrameVOILUTSequence", frame)
    src = item if item is not None and "WindowCenter" in item else ds
    if (
        "WindowCenter" in src
        and "WindowWidth" in src
        and src.WindowCenter not in (None, "")
        and src.WindowWidth not in (None, "")
    ):
        c = numbers(src.WindowCenter, "WindowCenter", path)[0]
        w = numbers(src.WindowWidth, "WindowWidth", path)[0]
        return (c, w) if w > 0 else None
    if ds.get("VOILUTSequence"):  # a VOI LUT table: its input range, for display only (FileVOI applies it)
        desc = ds.VOILUTSequence[0].get("LUTDescriptor")
        if desc is None or len(desc) != 3:
            raise CorruptImageError(path, "VOI LUT Sequence without a valid LUTDescriptor")
        n, first = int(desc[0] or 65536), float(desc[1])
        return first + n / 2, float(n)
    return None


def pixel_spacing(ds, frame: int, path: Path | None = None) -> tuple[float, float]:
    item = shared_item(ds, "PixelMeasuresSequence", frame)
    for src in (item, ds):
        if src is None:
            continue
        for key in ("PixelSpacing", "ImagerPixelSpacing"):
            value = src.get(key)
            if value is None or value == "":
                continue
            row, col = numbers(value, key, path, 2)
            if row > 0 and col > 0:  # zero spacing (seen in real files) counts as absent
                return row, col
    return 1.0, 1.0


def image_orientation(ds, frame: int = 0, path: Path | None = None) -> tuple[float, ...] | None:
    item = shared_item(ds, "PlaneOrientationSequence", frame)
    src = item if item is not None and "ImageOrientationPatient" in item else ds
    iop = src.get("ImageOrientationPatient")
    if iop is None or iop == "":
        return None
    cosines = numbers(iop, "ImageOrientationPatient", path, 6)
    if np.linalg.norm(np.cross(cosines[:3], cosines[3:])) < 1e-3:
        raise CorruptImageError(path, "ImageOrientationPatient row and column directions are parallel or zero")
    return tuple(cosines)


def position(ds, frame: int, path: Path | None = None) -> np.ndarray | None:
    item = shared_item(ds, "PlanePositionSequence", frame)
    src = item if item is not None and "ImagePositionPatient" in item else ds
    ipp = src.get("ImagePositionPatient")
    return np.array(numbers(ipp, "ImagePositionPatient", path, 3)) if ipp is not None and ipp != "" else None


def slice_normal(iop: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))


def orientation_letters(iop: tuple[float, ...], volume: bool) -> str:
    """Patient directions of (slices,) rows and columns, e.g. "SPL" for an axial stack sorted feet to head.

    Rows run along the column cosines, columns along the row cosines, slices along their normal.
    """

    def letter(v):
        k = int(np.argmax(np.abs(v)))
        return LPS[k] if v[k] > 0 else OPPOSITE[LPS[k]]

    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    letters = letter(col_dir) + letter(row_dir)
    return (letter(slice_normal(iop)) + letters) if volume else letters


def sort_along_normal(
    positions: list[np.ndarray], iop: tuple[float, ...], path: Path, what: str
) -> tuple[np.ndarray, tuple[float, ...], float]:
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
        raise CorruptImageError(
            path,
            f"{what}: {int(np.sum(steps < 1e-3)) + 1} slices share a position "
            "(several volumes, echoes or time points in one series?)",
            "one volume per series, or pick the volume explicitly",
        )
    spacing = float(np.median(steps))
    if np.max(np.abs(steps - spacing)) > 0.1 * spacing:
        raise CorruptImageError(
            path,
            f"{what}: irregular slice spacing (from {steps.min():.3g} to {steps.max():.3g} mm; missing slices?)",
            "evenly spaced slices",
        )
    return order, tuple(d.tolist()), spacing


def frame_order(ds, frames: int, iop, path: Path, notes: list[str]):
    found = [position(ds, i, path) for i in range(frames)]
    orients = [image_orientation(ds, i, path) for i in range(frames)]
    positions = [p for p in found if p is not None]
    if iop is None or len(positions) < len(found):
        between = numbers(ds.get("SpacingBetweenSlices", 0) or 0, "SpacingBetweenSlices", path, 1)[0]
        between = between if between > 0 else 0.0
        notes.append(
            f"{frames} frames without per-frame position: kept in stored order; slice spacing "
            + (f"{between} mm from SpacingBetweenSlices" if between > 0 else "unknown (1 mm shown)")
        )
        return np.arange(frames), (), between or 1.0
    if any(o is None or not np.allclose(o, iop, atol=1e-3) for o in orients):
        raise CorruptImageError(
            path, "frames have different orientations (a localizer or multi-plane object)", "frames of one plane"
        )
    order, pos, spacing = sort_along_normal(positions, iop, path, "frames")
    if not np.array_equal(order, np.arange(frames)):
        notes.append("frames re-ordered along the slice normal from their per-frame positions")
    return order, pos, spacing


def is_mosaic(ds) -> bool:
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def demosaic(ds, tiled: np.ndarray, path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel warns that its DICOM readers are experimental
            from nibabel.nicom import dicomwrappers  # imported here: it warns when imported (only for mosaics)

            wrapper = dicomwrappers.wrapper_from_data(ds)
            data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (columns, rows, slices), rescale applied
            voxel = wrapper.voxel_sizes
            iop = wrapper.image_orient_patient  # (3, 2): row and column direction cosines
    except Exception as e:
        raise CorruptImageError(
            path,
            f"Siemens mosaic cannot be de-tiled ({safe_message(e)})",
            "a mosaic with its CSA header (NumberOfImagesInMosaic)",
        ) from None
    if data.ndim != 3 or not np.all(np.isfinite(data)):
        raise CorruptImageError(path, f"Siemens mosaic de-tiles into an unusable array of shape {data.shape}")
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    cosines = tuple(float(v) for v in np.asarray(iop).T.ravel())
    spacing = (float(voxel[2]), float(voxel[1]), float(voxel[0]))
    return array, spacing, orientation_letters(cosines, volume=True)


def plain_value(value):
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, pydicom.multival.MultiValue):
        return [plain_value(v) for v in value]
    return str(value)


__all__ = [
    "shared_item",
    "numbers",
    "rescale",
    "window",
    "pixel_spacing",
    "image_orientation",
    "position",
    "slice_normal",
    "orientation_letters",
    "sort_along_normal",
    "frame_order",
    "is_mosaic",
    "demosaic",
    "plain_value",
    "LPS",
    "OPPOSITE",
]
