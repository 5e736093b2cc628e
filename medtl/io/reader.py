"""``read_image``: one entry point that recognises a file by its content, not only its suffix."""

from __future__ import annotations

from pathlib import Path

from medtl.errors import FileMissingError, UnsupportedFormatError
from medtl.io.cpu import cpu_limited
from medtl.io.dicom import read_dicom
from medtl.io.guard import reading
from medtl.io.image import read_picture
from medtl.io.limits import read_limits
from medtl.io.nifti import read_nifti
from medtl.io.scan import Scan
from medtl.io.series import read_series

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
ACCEPTED = "DICOM (.dcm or no suffix; a folder or .zip of a series), NIfTI (.nii, .nii.gz) or PNG/JPEG/TIFF"


def sniff_format(path: Path) -> str:
    """Return "dicom", "nifti" or "image" from the file's first bytes and its name."""
    name = path.name.lower()
    with open(path, "rb") as f:
        head = f.read(352)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")):
        return "image"
    if name.endswith(DICOM_SUFFIXES) or "." not in name:
        return "dicom"  # DICOM without preamble: pydicom decides (and says if it is not DICOM)
    if name.endswith(PICTURE_SUFFIXES):
        return "image"
    raise UnsupportedFormatError(path, "unrecognised file type", ACCEPTED)


def read_image(
    path: str | Path, volume_index: int | None = None, series_uid: str | None = None, modality: str | None = None
) -> Scan:
    """Read a DICOM file, a DICOM series (folder or .zip), a NIfTI volume or a PNG/JPEG/TIFF image.

    For a folder or zip, the series is chosen by :data:`medtl.io.series.SERIES_RULES`
    (``series_uid`` or ``modality`` override them). A 4D NIfTI needs ``volume_index``.

    Raises a subclass of :class:`medtl.errors.MedtlInputError` naming the file when it is
    missing, of an unsupported kind, damaged, over the memory budget (:mod:`medtl.io.limits`) or past its
    processor time (``ReadLimits.cpu_s``; in the main thread, :func:`medtl.io.cpu.cpu_limited`); no other
    exception leaves it. For files from untrusted sources see
    :func:`medtl.io.bounded.read_image_bounded`.
    """
    path = Path(path)
    with cpu_limited(path, read_limits().cpu_s), reading(path, "file"):
        if path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip"):
            return read_series(path, series_uid=series_uid, modality=modality)
        if not path.is_file():
            raise FileMissingError(path, "file not found" if not path.exists() else "not a regular file")
        kind = sniff_format(path)
        if kind == "dicom":
            return read_dicom(path)
        if kind == "nifti":
            return read_nifti(path, volume_index=volume_index)
        return read_picture(path)
