"""NIfTI volumes read with nibabel, reoriented to the closest canonical (RAS+) frame."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medtl.errors import CorruptImageError, UnsupportedFormatError
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
    if path.stat().st_size == 0:
        raise CorruptImageError(path, "file is empty", "a NIfTI-1 or NIfTI-2 volume")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise UnsupportedFormatError(path, f"not a NIfTI image ({type(img).__name__})")
        declared = int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        on_disk = path.stat().st_size * (1000 if path.name.lower().endswith(".gz") else 1) + 352
        if declared > on_disk or declared > (4 << 30):
            raise CorruptImageError(path, f"header declares {img.shape} voxels ({declared} bytes), far more than "
                                    "the file can hold; refused before allocating")
        affine = img.affine
        if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise CorruptImageError(path, "NIfTI affine is singular or not finite: geometry cannot be trusted")
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (UnsupportedFormatError, CorruptImageError):
        raise
    except Exception as e:  # nibabel raises many kinds for truncated or garbled files
        raise CorruptImageError(path, f"NIfTI cannot be read ({type(e).__name__}: {str(e)[:160]})") from None
    notes = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if volume_index is None:
            raise UnsupportedFormatError(path, f"4D NIfTI with {data.shape[3]} volumes",
                                         "a 3D volume, or pass volume_index")
        if not 0 <= volume_index < data.shape[3]:
            raise UnsupportedFormatError(path, f"volume_index {volume_index} out of range 0..{data.shape[3] - 1}")
        data = data[..., volume_index]
        notes.append(f"volume {volume_index} of {img.shape[3]} used")
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or min(data.shape) < 1:
        raise UnsupportedFormatError(path, f"NIfTI of shape {data.shape}", "a 2D, 3D or 4D image")
    if not np.all(np.isfinite(data)):
        raise CorruptImageError(path, "volume has NaN or infinite voxels")
    zooms = img.header.get_zooms()[:3]
    # (x: R, y: A, z: S) -> (slices, rows, columns) with anterior at the top, patient right on the left.
    array = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return Scan(array=array, spacing=spacing, modality="", source="nifti", path=path, orientation="SPL",
                header={"dimensions": list(data.shape)}, notes=notes)
