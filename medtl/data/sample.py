"""A small, deterministic, labelled synthetic CT study set in real file formats.

Class 1 images hold a faint round hypodense lesion (35-70 HU below the surrounding tissue,
8-14 px radius at 128 px, anywhere inside the body wall); class 0 images do not. Organs are brighter
ovals. Body shape, organs, texture, contrast and noise vary, so the task is learnable but not trivial.
Files are real DICOM (CT Image Storage, Rescale Slope/Intercept, synthetic patient identifiers) and NIfTI
volumes, listed in ``manifest.csv``.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from medtl.errors import RunExistsError

UID_ROOT = "1.2.826.0.1.3680043.10.1511."  # synthetic-data UIDs, deterministic from the seed


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape), sigma=scale)
    return n / (n.std() + 1e-8)


def _soft_disc(
    rng: np.random.Generator,
    inside: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    radius: tuple[float, float],
    edge: float,
) -> np.ndarray:
    """A round, soft-edged disc (1 inside, 0 outside) at a random point of ``inside``, its radius drawn from
    ``radius`` (pixels at 128 px), kept within ``inside``."""
    ys, xs = np.nonzero(inside)
    k = rng.integers(len(ys))
    r = rng.uniform(*radius) * yy.shape[0] / 128
    dist = np.sqrt((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2)
    return inside * (1.0 / (1.0 + np.exp((dist - r) / edge)))


def synthetic_ct_slice(rng: np.random.Generator, size: int, lesion: bool, calcification: bool = False) -> np.ndarray:
    """One axial CT-like slice in HU (float32), with or without a lesion (and a calcification: a small, dense
    spot, 250-500 HU above the tissue)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    ry, rx = size * rng.uniform(0.30, 0.40), size * rng.uniform(0.38, 0.46)
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img = np.full((size, size), -1000.0, np.float32)
    img[body] = rng.uniform(30, 50)
    fat = body & (((yy - cy) / (ry * 0.9)) ** 2 + ((xx - cx) / (rx * 0.9)) ** 2 > 1.0)
    img[fat] = rng.uniform(-110, -80)
    for _ in range(rng.integers(2, 4)):  # organs of various densities
        oy, ox = cy + rng.uniform(-0.4, 0.4) * ry, cx + rng.uniform(-0.5, 0.5) * rx
        a, b = rng.uniform(0.12, 0.3) * ry, rng.uniform(0.12, 0.3) * rx
        organ = body & ~fat & ((((yy - oy) / a) ** 2 + ((xx - ox) / b) ** 2) <= 1.0)
        img[organ] = img[organ] + rng.uniform(8, 30)
    img += body * _smooth_noise(rng, (size, size), 3.0) * rng.uniform(6, 12)  # tissue texture
    inner = body & ~fat
    if lesion:
        img -= _soft_disc(rng, inner, yy, xx, (8, 14), 1.2) * rng.uniform(35, 70)
    if calcification:
        img += _soft_disc(rng, inner, yy, xx, (2.0, 3.5), 0.6) * rng.uniform(250, 500)
    img += rng.normal(0, rng.uniform(8, 16), img.shape).astype(np.float32)  # quantum noise
    return img


def _write_ct_dicom(path: Path, hu: np.ndarray, patient: str, seed: int, index: int, spacing: float) -> None:
    stored = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT, entropy_srcs=[str(seed), patient, str(index), "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(UID_ROOT, entropy_srcs=[str(seed), patient, "study"])
    ds.SeriesInstanceUID = generate_uid(UID_ROOT, entropy_srcs=[str(seed), patient, "series"])
    ds.PatientID = patient
    ds.PatientName = f"SYNTHETIC^{patient}"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = (datetime.date(2024, 1, 1) + datetime.timedelta(days=index)).strftime("%Y%m%d")
    ds.Modality = "CT"
    ds.BodyPartExamined = "ABDOMEN"
    ds.Manufacturer = "medtl synthetic"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    spacing = round(spacing, 6)  # DS values hold at most 16 characters
    ds.ImagePositionPatient = [
        round(-spacing * hu.shape[1] / 2, 4),
        round(-spacing * hu.shape[0] / 2, 4),
        float(index) * 5.0,
    ]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 5.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


CLASS_NAMES = ("no lesion", "lesion")  # label 0, label 1


def create_sample_data(
    out_dir: str | Path,
    n_patients: int = 200,  # with the 8 volumes' patients: about 42 test patients at test_fraction 0.2
    images_per_patient: int = 2,
    n_volumes: int = 8,
    size: int = 128,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write the synthetic study set into ``out_dir`` and return the path of its manifest.

    Half of the patients are positive (every image of theirs shows a lesion). Patients
    ``SYN0001``... have 2D DICOM slices; patients ``SYNV001``... have one NIfTI volume each.
    """
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    if manifest.exists() and not force:
        raise RunExistsError(f"{manifest} exists; pass force=True (CLI: --force) to write it again")
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    (out / "nifti").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        patient, label = f"SYN{p + 1:04d}", p % 2
        spacing = float(rng.uniform(0.65, 0.9))
        for i in range(images_per_patient):
            hu = synthetic_ct_slice(rng, size, lesion=bool(label))
            name = f"dicom/img_{len(rows) + 1:04d}.dcm"  # file names carry no patient identifier
            _write_ct_dicom(out / name, hu, patient, seed, i, spacing)
            rows.append(
                {
                    "image": name,
                    "label": label,
                    "label_name": CLASS_NAMES[label],
                    "patient_id": patient,
                    "modality": "CT",
                }
            )
    for v in range(n_volumes):
        patient, label = f"SYNV{v + 1:03d}", v % 2
        depth = 12
        vol = np.stack([synthetic_ct_slice(rng, size, lesion=False) for _ in range(depth)])
        if label:  # a lesion through the middle slices
            vol[depth // 2 - 1 : depth // 2 + 2] = np.stack(
                [synthetic_ct_slice(rng, size, lesion=True) for _ in range(3)]
            )
        spacing = float(rng.uniform(0.65, 0.9))
        data = vol[:, ::-1, ::-1].transpose(2, 1, 0)  # display (slices, rows, cols) -> RAS (x, y, z)
        img = nib.Nifti1Image(np.round(data).astype(np.int16), np.diag([spacing, spacing, 3.0, 1.0]))
        img.header.set_xyzt_units("mm")
        name = f"nifti/vol_{v + 1:03d}.nii.gz"
        nib.save(img, out / name)
        rows.append(
            {"image": name, "label": label, "label_name": CLASS_NAMES[label], "patient_id": patient, "modality": "CT"}
        )
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label", "label_name", "patient_id", "modality"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


FINDINGS = ("calcification", "lesion")  # the findings of the multi-label sample


def create_multilabel_sample(
    out_dir: str | Path,
    n_patients: int = 64,
    images_per_patient: int = 1,
    size: int = 96,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a synthetic multi-label CT set (DICOM slices) into ``out_dir``; return its manifest's path.

    Each patient has, independently, a hypodense lesion (half of them) and a calcification (a third of
    them), on every image of theirs; the manifest lists them in a ``findings`` column (``lesion|calcification``,
    ``No Finding`` for none).
    """
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    if manifest.exists() and not force:
        raise RunExistsError(f"{manifest} exists; pass force=True (CLI: --force) to write it again")
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        patient = f"SYNM{p + 1:04d}"
        has = {"lesion": p % 2 == 1, "calcification": p % 3 == 0}
        spacing = float(rng.uniform(0.65, 0.9))
        for i in range(images_per_patient):
            hu = synthetic_ct_slice(rng, size, lesion=has["lesion"], calcification=has["calcification"])
            name = f"dicom/img_{len(rows) + 1:04d}.dcm"
            _write_ct_dicom(out / name, hu, patient, seed, i, spacing)
            rows.append(
                {
                    "image": name,
                    "findings": "|".join(f for f in FINDINGS if has[f]) or "No Finding",
                    "patient_id": patient,
                    "modality": "CT",
                }
            )
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "findings", "patient_id", "modality"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def create_sample_series(
    out_dir: str | Path, n_slices: int = 100, size: int = 128, seed: int = 0, lesion: bool = True
) -> Path:
    """Write one synthetic axial CT series (``n_slices`` DICOM files, 5 mm apart) into ``out_dir``.

    File names are shuffled with respect to slice position, as they often are in exports; with
    ``lesion`` the middle third of the slices shows the lesion.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = rng.permutation(n_slices)
    for k in range(n_slices):
        show = lesion and n_slices // 3 <= k < 2 * n_slices // 3
        hu = synthetic_ct_slice(rng, size, lesion=show)
        _write_ct_dicom(out / f"IM{names[k]:05d}", hu, f"SYNS{seed:03d}", seed, k, 0.75)
    return out
