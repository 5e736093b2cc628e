"""The seed files mutants are made from: small files of every kind the readers take, made here (the same
bytes every run), and the real files of the data folder."""

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from medtl.errors import FileMissingError, UnsupportedFormatError
from medtl.io.reader import sniff_format
from tools.fuzz.formats import zip_bytes

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("dicom", "nifti", "picture", "zip", "config", "npz", "manifest", "folder")
UID_ROOT = "1.2.826.0.1.3680043.10.1511.9"  # fixed UIDs: the seeds are the same bytes every run


@dataclass(frozen=True)
class Seed:
    """A file mutants are made from."""

    id: str  # "gen:<name>" or "data:<path relative to the data folder>"
    kind: str  # dicom, nifti, picture, zip; config (YAML), npz (MedMNIST layout), manifest (CSV), folder (a tree)
    suffix: str  # its name's suffix, kept by its mutants (readers look at names too)
    data: bytes

    @property
    def gzipped(self) -> bool:
        """A .nii.gz (or other .gz) file."""
        return self.suffix.lower().endswith(".gz")


def name_suffix(name: str) -> str:
    """A file name's suffix, ``.nii.gz`` counted as one."""
    return name[-7:] if name.lower().endswith(".nii.gz") else Path(name).suffix


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _new_dicom(sop_class: UID, n: int, modality: str) -> Dataset:
    uid = f"{UID_ROOT}.{n}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(uid + ".1")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid + ".1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid + ".2", uid + ".3"
    ds.PatientID, ds.Modality = "FUZZ", modality
    return ds


def _ct_slice(rng: np.random.Generator, size: int) -> np.ndarray:
    """A CT-like slice in HU: air, a body ellipse, a brighter organ, noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    hu[(yy / 0.35) ** 2 + (xx / 0.42) ** 2 <= 1] = 40
    hu[((yy - 0.05) / 0.12) ** 2 + ((xx + 0.1) / 0.15) ** 2 <= 1] = 70
    return hu + rng.normal(0, 10, hu.shape)


def _ct_dicom(rng: np.random.Generator, size: int, n: int, index: int, series: int) -> bytes:
    """A CT Image Storage slice as a scanner writes it: 12 bits stored, rescale to HU, patient geometry."""
    ds = _new_dicom(CTImageStorage, n, "CT")
    ds.SeriesInstanceUID = f"{UID_ROOT}.{series}.3"
    ds.StudyInstanceUID = f"{UID_ROOT}.{series}.2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber, ds.SeriesNumber = index + 1, 1
    ds.ImagePositionPatient = [-12.0, -12.0, 5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.75, 0.75], 5.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = np.clip(np.round(_ct_slice(rng, size) + 1024), 0, 4095).astype(np.uint16).tobytes()
    return _dicom_bytes(ds)


def _generated(name: str, kind: str, data: bytes) -> Seed:
    return Seed(f"gen:{name}", kind, name_suffix(name), data)


def _test_pattern() -> tuple[np.ndarray, np.ndarray]:
    """A 24 x 32 grey ramp pattern and an RGB picture made of it."""
    grey = ((np.add.outer(np.arange(24), np.arange(32)) * 5) % 256).astype(np.uint8)
    return grey, np.stack([grey, grey[::-1], 255 - grey], -1)


def _dicom_seeds(rng: np.random.Generator, rgb: np.ndarray) -> list[Seed]:
    """CT slices (with and without a suffix, and deflated), an RGB secondary capture and a multi-frame MR."""
    ct = _ct_dicom(rng, 32, 10, 0, 10)
    seeds = [
        _generated("ct_slice.dcm", "dicom", ct),
        _generated("ct_slice_no_suffix", "dicom", _ct_dicom(rng, 32, 11, 1, 11)),
    ]
    deflated = pydicom.dcmread(io.BytesIO(ct))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    seeds.append(_generated("ct_deflated.dcm", "dicom", _dicom_bytes(deflated)))
    ds = _new_dicom(SecondaryCaptureImageStorage, 1, "OT")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 24, 32, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    seeds.append(_generated("rgb.dcm", "dicom", _dicom_bytes(ds)))
    ds = _new_dicom(MRImageStorage, 2, "MR")
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 16, 16, 3, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = (np.arange(3 * 16 * 16, dtype=np.uint16) % 4096).tobytes()
    seeds.append(_generated("multiframe.dcm", "dicom", _dicom_bytes(ds)))
    return seeds


def _nifti_seeds(rng: np.random.Generator) -> list[Seed]:
    """A CT-like volume as .nii.gz and a small ramp volume as .nii."""
    vol = np.stack([_ct_slice(rng, 32) for _ in range(8)], -1).round().astype(np.int16)
    ct_volume = nib.Nifti1Image(vol, np.diag([0.75, 0.75, 3.0, 1.0]))
    ct_volume.header.set_xyzt_units("mm")
    small = nib.Nifti1Image(np.arange(16 * 12 * 6, dtype=np.int16).reshape(16, 12, 6), np.diag([0.9, 0.8, 2.5, 1.0]))
    return [
        _generated("ct_volume.nii.gz", "nifti", gzip.compress(ct_volume.to_bytes(), 6, mtime=0)),
        _generated("small.nii", "nifti", small.to_bytes()),
    ]


def _picture(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _picture_seeds(grey: np.ndarray, rgb: np.ndarray) -> list[Seed]:
    """Grey, RGB and 16-bit PNG, JPEG and TIFF pictures."""
    grey16 = grey.astype(np.uint16) * 257
    return [
        _generated("grey.png", "picture", _picture(grey, "PNG")),
        _generated("rgb.png", "picture", _picture(rgb, "PNG")),
        _generated("grey16.png", "picture", _picture(grey16, "PNG")),
        _generated("grey.jpg", "picture", _picture(grey, "JPEG", quality=90)),
        _generated("rgb.jpg", "picture", _picture(rgb, "JPEG", quality=90)),
        _generated("grey16.tif", "picture", _picture(grey16, "TIFF")),
        _generated("rgb.tif", "picture", _picture(rgb, "TIFF")),
    ]


def generated_seeds() -> list[Seed]:
    """Small seed files of every kind the readers take, made here (the same bytes every run)."""
    rng = np.random.default_rng(0)  # drawn from in this order: DICOM slices, the NIfTI volume, the zipped series
    grey, rgb = _test_pattern()
    dicom, nifti = _dicom_seeds(rng, rgb), _nifti_seeds(rng)
    series = zip_bytes([(f"IM{k:04d}", _ct_dicom(rng, 32, 20 + k, k, 20)) for k in (2, 0, 3, 1)])
    from tools.fuzz.input_seeds import input_seeds  # (it builds on this module)

    others = input_seeds(dicom[0].data, [(f"IM{k:04d}", _ct_dicom(rng, 32, 40 + k, k, 40)) for k in range(3)])
    return [*dicom, *nifti, *_picture_seeds(grey, rgb), _generated("series.zip", "zip", series), *others]


def _data_file_seed(p: Path, data: Path) -> Seed | None:
    """The seed of one file of the data folder, or None where it is not one read_image takes as a file."""
    rel = p.relative_to(data).as_posix()
    if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
        return None
    if p.name.lower().endswith((".npz", ".md", ".txt", ".csv", ".json", ".zip")):
        return None
    try:
        kind = sniff_format(p)
    except (UnsupportedFormatError, OSError):  # not a kind read_image takes
        return None
    kind = "picture" if kind == "image" else kind
    if kind != "picture" and rel.split("/")[0] not in ("dicom", "nifti"):
        return None
    return Seed("data:" + rel, kind, name_suffix(p.name), p.read_bytes())


def _series_zip_seeds(data: Path) -> list[Seed]:
    """A zip of each folder under data/dicom/series (itself included) of at most 16 MiB of files."""
    series_root = data / "dicom" / "series"
    if not series_root.is_dir():
        return []
    seeds = []
    for d in sorted([series_root, *(q for q in series_root.rglob("*") if q.is_dir())]):
        files = sorted(q for q in d.rglob("*") if q.is_file() and q.name.upper() != "DICOMDIR")
        if files and sum(f.stat().st_size for f in files) <= 16 << 20:
            members = [(f.relative_to(d).as_posix(), f.read_bytes()) for f in files]
            seeds.append(Seed("data:" + d.relative_to(data).as_posix() + ".zip", "zip", ".zip", zip_bytes(members)))
    return seeds


def data_seeds(data: Path) -> list[Seed]:
    """Every DICOM and NIfTI file under data/dicom and data/nifti, pictures anywhere, and a zip per series folder."""
    files = [s for s in (_data_file_seed(p, data) for p in sorted(data.rglob("*"))) if s is not None]
    return files + _series_zip_seeds(data)


def default_data_dir() -> Path:
    """$MEDTL_SHARED_DATA, else ../shared/data beside the repository."""
    if os.environ.get("MEDTL_SHARED_DATA"):
        return Path(os.environ["MEDTL_SHARED_DATA"])
    return ROOT.parent / "shared" / "data"


def load_seeds(which: str, data: Path | None = None) -> list[Seed]:
    """The seed files of a run: ``which`` is generated, data or both."""
    seeds = []
    if which in ("generated", "both"):
        seeds += generated_seeds()
    if which in ("data", "both"):
        if data is None or not Path(data).is_dir():
            raise FileMissingError(data, "data folder not found", "a folder with dicom/ and nifti/ (--data)")
        seeds += data_seeds(Path(data))
    return seeds
