"""Readers on the real files of ../shared/data, checked against pydicom, dcmtk and nibabel.

Marked ``shared_data``: they skip, saying why, where ../shared/data is absent (a user's clone).
"""

import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medtl.errors import CorruptImageError, UnsupportedFormatError
from medtl.io import read_image

pytestmark = pytest.mark.shared_data


def _single_files(shared):
    return sorted((shared / "dicom").glob("*/*.dcm"))


def _frame_order(ds, frames):
    """Frame indices sorted along the normal of the orientation, from the per-frame positions (stored
    order for a multi-frame object without per-frame positions)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return np.arange(frames)
    groups = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0]
    plane = (groups[0].get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0]
    iop = np.array([float(v) for v in plane.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dist = [
        float(np.dot([float(v) for v in groups[i].PlanePositionSequence[0].ImagePositionPatient], normal))
        for i in range(frames)
    ]
    return np.argsort(dist, kind="stable")


def test_every_real_dicom_matches_pydicom_after_rescale(shared_data):
    for path in _single_files(shared_data):
        ds = pydicom.dcmread(path)
        scan = read_image(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        raw = ds.pixel_array.astype(np.float64)
        if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
            pv = ds.SharedFunctionalGroupsSequence[0].get("PixelValueTransformationSequence")
            slope, intercept = (float(pv[0].RescaleSlope), float(pv[0].RescaleIntercept)) if pv else (1.0, 0.0)
            expected = raw * slope + intercept
        else:
            expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":  # inverted within the stored range, rescaled
            bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            expected = (lo + hi) * slope + 2 * intercept - expected
        padding = np.zeros(expected.shape, bool)
        if "PixelPaddingValue" in ds:
            padding |= ds.pixel_array == int(ds.PixelPaddingValue)
        if ds.Modality == "CT":
            padding |= expected < -1100  # below air: outside the field of view
        if padding.any():  # padding is the background (the lowest real value), and out of the statistics
            assert scan.padding is not None and np.array_equal(scan.padding, padding.reshape(scan.padding.shape)), (
                path.name
            )
            assert np.all(scan.array[scan.padding] == expected[~padding].min()), path.name
            expected = np.where(padding, expected[~padding].min(), expected)
        else:
            assert scan.padding is None, path.name
        if frames > 1:  # frames in the order of their positions along the slice normal, computed here
            expected = expected.reshape(frames, *expected.shape[-2:])[_frame_order(ds, frames)]
        np.testing.assert_allclose(
            scan.array, expected.reshape(scan.array.shape), err_msg=path.name, rtol=1e-6, atol=1e-3
        )
        if ds.Modality == "CT":
            assert scan.units == "HU", path.name
            assert scan.array.min() >= -1100 and scan.array.max() < 5000, path.name


def _dcmdump_values(path, outdir):
    text = subprocess.run(
        ["dcmdump", "+L", "+W", str(outdir), str(path)], capture_output=True, encoding="latin-1", check=True
    ).stdout

    def value(tag):
        m = re.search(rf"^\({tag}\) \w\w \[?([-\d.]+)", text, re.M)  # top level only (not the icon image)
        return float(m.group(1)) if m else None

    raw = re.search(r"^\(7fe0,0010\) \w\w =(\S+)", text, re.M).group(1)  # the file dcmtk wrote the pixel data to
    return {
        k: value(t)
        for k, t in [
            ("rows", "0028,0010"),
            ("cols", "0028,0011"),
            ("bits", "0028,0100"),
            ("signed", "0028,0103"),
            ("intercept", "0028,1052"),
            ("slope", "0028,1053"),
        ]
    }, raw


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump not installed (apt-get install dcmtk)")
def test_uncompressed_real_dicom_matches_dcmtk(shared_data, tmp_path):
    checked = 0
    for path in _single_files(shared_data):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if (
            ds.file_meta.TransferSyntaxUID.is_compressed
            or int(ds.get("NumberOfFrames", 1) or 1) > 1
            or ds.PhotometricInterpretation != "MONOCHROME2"
        ):
            continue
        out = tmp_path / path.stem
        out.mkdir()
        v, raw = _dcmdump_values(path, out)
        dtype = {(16, 0): "<u2", (16, 1): "<i2", (8, 0): "u1"}[(int(v["bits"]), int(v["signed"]))]
        stored = np.fromfile(raw, dtype=dtype)[: int(v["rows"] * v["cols"])].reshape(int(v["rows"]), int(v["cols"]))
        bits_stored = int(ds.BitsStored)
        if int(v["signed"]) == 0 and bits_stored < int(v["bits"]):
            stored = stored & ((1 << bits_stored) - 1)
        expected = stored * (v["slope"] or 1.0) + (v["intercept"] or 0.0)
        scan = read_image(path)
        real = np.ones(expected.shape, bool) if scan.padding is None else ~scan.padding  # padding: see above
        np.testing.assert_allclose(scan.array[real], expected[real], rtol=1e-6, atol=1e-3, err_msg=path.name)
        checked += 1
    assert checked >= 4


def test_real_series_sorted_and_chosen(shared_data):
    hitachi = read_image(shared_data / "dicom/series/dicom2nifti_hitachi_mr64")
    assert hitachi.array.shape == (4, 64, 64) and hitachi.spacing[0] > 0
    positions = np.asarray(hitachi.slice_positions)
    assert np.all(np.diff(positions) > 0)
    study = read_image(shared_data / "dicom/series/pydicom_dicomdirtests")
    assert study.modality == "CT" and study.array.shape[0] == 5
    assert "localizer" in study.header["series_choice"]
    mosaic = sorted((shared_data / "dicom/series/dcm_qa_siemens_epi_mosaic_axasc36").iterdir())[0]
    scan = read_image(mosaic)
    assert scan.array.shape == (36, 64, 64) and scan.spacing == pytest.approx((3.6, 3.25, 3.25), rel=1e-3)
    with pytest.raises(CorruptImageError, match="each a volume"):
        read_image(mosaic.parent)  # two mosaics = two time points: refused, not stacked


def test_real_nifti_geometry_matches_nibabel(shared_data):
    for path in sorted((shared_data / "nifti").glob("*.nii*")):
        img = nib.as_closest_canonical(nib.load(path))
        if img.ndim == 4 and img.shape[3] > 1:
            with pytest.raises(UnsupportedFormatError, match="4D"):
                read_image(path)
            scan = read_image(path, volume_index=1)
        else:
            scan = read_image(path)
        shape = img.shape[:3]
        assert scan.array.shape == (shape[2], shape[1], shape[0]), path.name
        zooms = img.header.get_zooms()[:3]
        assert scan.spacing == pytest.approx((zooms[2], zooms[1], zooms[0])), path.name


def test_breastmnist_keeps_its_published_split(shared_data):
    from medtl.data import read_dataset

    m = read_dataset(shared_data / "medmnist/breastmnist.npz")
    assert {k: len(v) for k, v in m.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert m.label_counts(m.splits["train"]) == {"malignant": 147, "normal, benign": 399}  # MedMNIST's label names
