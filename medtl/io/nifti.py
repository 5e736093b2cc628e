"""NIfTI volumes read with nibabel, reoriented to the closest canonical (RAS+) frame."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np

from medtl.errors import CorruptImageError, FileMissingError, InputTooLargeError, UnsupportedFormatError
from medtl.io.guard import reading
from medtl.io.limits import read_limits
from medtl.io.scan import Scan


def read_nifti(path: str | Path, volume_index: int | None = None) -> Scan:
    """Read a .nii/.nii.gz file as a (slices, rows, columns) volume in display orientation.

    The image is first reoriented to RAS+ (``nibabel.as_closest_canonical``); axial slices are
    then laid out as on a radiology screen (anterior up, patient's right on the image's left),
    i.e. slices run inferior→superior, rows anterior→posterior, columns right→left ("SPL", the
    same letters a DICOM axial stack gets). Spacing comes from the reoriented affine's zooms.
    A 4D file needs ``volume_index``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileMissingError(path, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise CorruptImageError(path, "file is empty", "a NIfTI-1 or NIfTI-2 volume")
    with reading(path, "NIfTI volume"):
        img = _load_canonical(path)
        data = _voxels(img)
    data, notes = _select_volume(data, volume_index, path)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or min(data.shape) < 1:
        raise UnsupportedFormatError(path, f"NIfTI of shape {data.shape}", "a 2D, 3D or 4D image")
    if not np.all(np.isfinite(data)):
        raise CorruptImageError(path, "volume has NaN or infinite voxels")
    zooms = tuple(img.header.get_zooms()[:3]) + (1.0,) * 3  # a 2D image has two
    # (x: R, y: A, z: S) -> (slices, rows, columns) with anterior at the top, patient right on the left.
    array = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return Scan(
        array=array,
        spacing=spacing,
        modality="",
        source="nifti",
        path=path,
        orientation="SPL",
        header={"dimensions": list(data.shape)},
        notes=notes,
    )


def _voxels(img) -> np.ndarray:
    """The voxels as float32, scaled by the header's slope and intercept in float32, in place (nibabel scales in
    float64: twice the memory of the volume it returns)."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if not hasattr(proxy, "get_unscaled") or (slope == 1.0 and inter == 0.0):
        return np.asarray(proxy, dtype=np.float32)
    data = np.asarray(proxy.get_unscaled(), dtype=np.float32)
    data *= np.float32(slope)
    data += np.float32(inter)
    return data


def _load_canonical(path: Path):
    """The NIfTI image of ``path`` reoriented to RAS+, once its size, memory need and affine are checked."""
    _check_extensions(path)
    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnsupportedFormatError(path, f"not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(v) for v in img.shape)
    if not shape or min(shape) < 1:
        raise CorruptImageError(path, f"NIfTI dimensions {shape} hold no voxels")
    voxels = int(np.prod(shape, dtype=object))
    declared = voxels * img.get_data_dtype().itemsize
    _check_holds(path, declared + int(img.header.get("vox_offset", 0) or 0))
    # stored values + float32 + the reoriented copy
    read_limits().check(path, declared + voxels * 8, f"a {'x'.join(map(str, shape))} volume")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CorruptImageError(path, "NIfTI affine is singular or not finite: geometry cannot be trusted")
    return nib.as_closest_canonical(img)


def _select_volume(data: np.ndarray, volume_index: int | None, path: Path) -> tuple[np.ndarray, list[str]]:
    """(the one volume of ``data`` to use, notes): a 4D image's ``volume_index``-th volume, else ``data`` itself."""
    notes: list[str] = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if volume_index is None:
            raise UnsupportedFormatError(
                path,
                f"4D NIfTI with {data.shape[3]} volumes",
                "a single 3D volume (one volume of a 4D file is read only where the configuration names it: "
                "data.volume_index)",
            )
        if not 0 <= volume_index < data.shape[3]:
            raise UnsupportedFormatError(path, f"volume_index {volume_index} out of range 0..{data.shape[3] - 1}")
        notes.append(f"volume {volume_index} of {data.shape[3]} used")
        data = data[..., volume_index]
    return data, notes


def _check_holds(path: Path, needed: int) -> None:
    """Refuse, before allocating, a file that cannot hold the voxels its header declares.

    For .nii.gz the uncompressed size is the gzip trailer's (exact for files under 4 GiB, a
    single gzip member as nibabel writes); where the trailer cannot tell, the stream is
    decompressed in pieces without keeping it.
    """
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        if size < needed:
            raise CorruptImageError(
                path, f"header declares {needed} bytes of data but the file holds {size}; refused before allocating"
            )
        return
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise CorruptImageError(path, "named .gz but not gzip-compressed")
        f.seek(-4, 2)
        trailer = struct.unpack("<I", f.read(4))[0]
    if size < (1 << 32) and trailer >= needed % (1 << 32) and needed < (1 << 32):
        return  # the common case: the trailer says the stream holds enough
    held = 0
    with gzip.open(path, "rb") as g:
        while held < needed:
            piece = g.read(1 << 22)
            if not piece:
                break
            held += len(piece)
    if held < needed:
        raise CorruptImageError(
            path, f"header declares {needed} bytes of data but the file inflates to {held}; refused before allocating"
        )


MAX_EXTENSIONS = 64  # header extensions (a file has a few at most; nibabel parses each in Python)
_HEADER = {348: (108, "f"), 540: (168, "q")}  # NIfTI-1 / NIfTI-2: header size -> vox_offset's offset and type


def _check_extensions(path: Path) -> None:
    """Refuse a header whose extensions nibabel would spend seconds on or read past: more than
    :data:`MAX_EXTENSIONS`, or a size that is not a multiple of 16 bytes (a size of 7 made it read the whole
    stream). Read from the header's bytes before nibabel parses them; files that are not NIfTI pass."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(544)
            order = next((o for o in "<>" if struct.unpack(o + "i", head[:4])[0] in _HEADER), None)
            if order is None:
                return
            size = struct.unpack(order + "i", head[:4])[0]
            where, kind = _HEADER[size]
            (vox_offset,) = struct.unpack(order + kind, head[where : where + struct.calcsize(kind)])
            if len(head) < size + 4 or head[size] == 0:
                return  # no extension flag
            at, count, end = size + 4, 0, int(vox_offset) if vox_offset > size + 4 else None
            f.seek(at)
            while end is None or at + 8 <= end:
                block = f.read(8)
                if len(block) < 8:
                    break
                esize, _ = struct.unpack(order + "ii", block)
                if esize < 16 or esize % 16:
                    raise CorruptImageError(path, f"NIfTI header extension of {esize} bytes", "a multiple of 16")
                count += 1
                if count > MAX_EXTENSIONS:
                    raise InputTooLargeError(path, f"NIfTI header has more than {MAX_EXTENSIONS} extensions")
                at += esize
                f.seek(at)
                if end is None:
                    break  # no vox_offset to bound them: nibabel reads one
    except (CorruptImageError, InputTooLargeError):
        raise
    except Exception:
        return  # unreadable or truncated: nibabel reports it, typed, below
