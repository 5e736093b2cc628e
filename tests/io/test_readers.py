import gzip

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtl.errors import CorruptImageError, FileMissingError, MedtlInputError, UnsupportedFormatError
from medtl.io import read_image


def test_text_file_named_dcm_is_rejected_naming_the_file(tmp_path):
    bad = tmp_path / "scan_001.dcm"
    bad.write_text("this is not a scan")
    with pytest.raises(UnsupportedFormatError) as e:
        read_image(bad)
    assert "scan_001.dcm" in str(e.value) and "not a DICOM" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileMissingError, match="nothere.nii.gz"):
        read_image(tmp_path / "nothere.nii.gz")


def test_empty_and_truncated_nifti(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty.nii.gz.*empty"):
        read_image(empty)
    good = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.int16), np.eye(4)), good)
    raw = gzip.decompress(good.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[:400]))
    with pytest.raises(MedtlInputError, match="cut.nii.gz"):
        read_image(cut)


def test_nifti_singular_affine_and_nan_refused(tmp_path):
    p = tmp_path / "sing.nii"
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    nib.save(img, p)
    raw = bytearray(p.read_bytes())  # zero the sform rows (bytes 280-328) and drop the qform
    raw[280:328] = bytes(48)
    raw[252:254] = (0).to_bytes(2, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptImageError, match="affine"):
        read_image(p)
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    p = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    with pytest.raises(CorruptImageError, match="NaN"):
        read_image(p)


def test_nifti_orientation_does_not_depend_on_storage_order(tmp_path):
    # A marker at the patient's right-anterior-superior corner, stored once in RAS, once in LPS.
    ras = np.zeros((6, 5, 4), np.int16)
    ras[5, 4, 3] = 100  # largest x, y, z: the patient's right, anterior and superior-most voxel
    a = tmp_path / "ras.nii"
    nib.save(nib.Nifti1Image(ras, np.diag([1.0, 2.0, 3.0, 1.0])), a)
    lps = ras[::-1, ::-1, :]
    aff = np.diag([-1.0, -2.0, 3.0, 1.0])
    aff[:3, 3] = [5.0, 8.0, 0.0]  # keep the same world positions
    b = tmp_path / "lps.nii"
    nib.save(nib.Nifti1Image(lps, aff), b)
    sa, sb = read_image(a), read_image(b)
    np.testing.assert_array_equal(sa.array, sb.array)
    assert sa.array.shape == (4, 5, 6) and sa.spacing == (3.0, 2.0, 1.0)
    # radiological display: the patient's right on the image's left, anterior at the top
    assert sa.array[3, 0, 0] == 100


def test_4d_nifti_needs_a_volume_index(tmp_path):
    p = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2), np.eye(4)), p)
    with pytest.raises(UnsupportedFormatError, match="4D"):
        read_image(p)
    assert read_image(p, volume_index=1).array.shape == (4, 3, 2)


def test_pydicom_ct_in_hounsfield_units():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    scan = read_image(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(scan.array, expected)
    assert scan.modality == "CT" and scan.units == "HU"
    assert scan.spacing == tuple(float(v) for v in ds.PixelSpacing)


def _ct(tmp_path, name="ct.dcm", **drop):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key in drop:
        delattr(ds, key)
    p = tmp_path / name
    ds.save_as(p)
    return p, ds


def test_ct_without_rescale_intercept_refused(tmp_path):
    p, _ = _ct(tmp_path, RescaleIntercept=True)
    with pytest.raises(CorruptImageError, match="Rescale Intercept"):
        read_image(p)


def test_truncated_pixel_data_and_bad_bits_refused(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    p = tmp_path / "short.dcm"
    ds.save_as(p)
    with pytest.raises(CorruptImageError, match="short.dcm.*fewer"):
        read_image(p)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BitsStored = 20
    p = tmp_path / "bits.dcm"
    ds.save_as(p)
    with pytest.raises(CorruptImageError, match="BitsStored"):
        read_image(p)


def test_no_patient_identifier_in_summary_or_errors(tmp_path):
    p, ds = _ct(tmp_path)
    text = str(read_image(p).summary())
    assert str(ds.PatientName) not in text and str(ds.PatientID) not in text
    p2, ds2 = _ct(tmp_path, name="noint.dcm", RescaleIntercept=True)
    with pytest.raises(CorruptImageError) as e:
        read_image(p2)
    assert str(ds2.PatientID) not in str(e.value) and str(ds2.PatientName) not in str(e.value)


def test_png_8_and_16_bit_grey_and_rgb(tmp_path):
    from PIL import Image

    grey = (np.arange(64 * 32) % 251).reshape(32, 64).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png").array, grey)
    deep = (np.arange(64 * 32) * 29).reshape(32, 64).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png").array, deep)
    rgb = np.stack([grey] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    assert read_image(tmp_path / "c.jpg").array.shape == (32, 64)
