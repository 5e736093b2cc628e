"""DICOM series from folders and zips: grouping, spatial sorting, choice rules and refusals."""

import json
import zipfile

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtl.cli import main
from medtl.errors import CorruptImageError, InputTooLargeError
from medtl.io import choose_series, describe_path, list_series, read_image


def write_series(
    folder,
    n=5,
    spacing=2.5,
    series_uid=None,
    study_uid="1.2.3.4",
    image_type=None,
    number=3,
    shuffle=True,
    positions=None,
    orientation=(1, 0, 0, 0, 1, 0),
):
    """Write an axial CT series whose file names and InstanceNumbers do NOT follow slice position.

    Slice k has all pixels equal to 100*k before rescale, so the stored order is visible.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    for file_no, k in enumerate(order):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.SeriesNumber = number
        ds.InstanceNumber = int(n - k)  # deliberately reversed
        z = positions[k] if positions is not None else -50.0 + spacing * k
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = list(orientation)
        if image_type:
            ds.ImageType = image_type
        pixels = np.full((ds.Rows, ds.Columns), 100 * k, np.int16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"file_{file_no:03d}.dcm")
    return series_uid


def test_slices_sorted_by_position_along_the_normal_not_by_name_or_instance_number(tmp_path):
    write_series(tmp_path / "s", n=5, spacing=2.5)
    scan = read_image(tmp_path / "s")
    assert scan.array.shape == (5, 128, 128)
    intercept = -1024
    np.testing.assert_allclose(scan.array[:, 0, 0], [100 * k + intercept for k in range(5)])
    assert scan.spacing[0] == pytest.approx(2.5)
    assert scan.orientation == "SPL" and scan.units == "HU"
    assert list(scan.slice_positions) == pytest.approx([-50 + 2.5 * k for k in range(5)])


def test_zip_reads_like_the_folder(tmp_path):
    write_series(tmp_path / "s", n=4)
    z = tmp_path / "study.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in sorted((tmp_path / "s").iterdir()):
            f.write(p, f"DICOM/{p.name}")
    np.testing.assert_array_equal(read_image(z).array, read_image(tmp_path / "s").array)


def test_localizer_left_out_and_the_choice_reported(tmp_path):
    study = tmp_path / "study"
    axial = write_series(study / "axial", n=6, number=2)
    write_series(study / "scout", n=8, number=1, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    listing = list_series(study)
    assert len(listing.series) == 2
    chosen, reason = choose_series(listing)
    assert chosen.uid == axial and "localizer" in reason
    scan = read_image(study)
    assert scan.array.shape[0] == 6 and "localizer" in scan.header["series_choice"]
    other = next(s.uid for s in listing.series if s.uid != axial)
    assert read_image(study, series_uid=other).array.shape[0] == 8  # the user overrides the rules


def test_gaps_duplicates_and_mixed_orientation_refused(tmp_path):
    write_series(tmp_path / "gap", n=4, positions=[0.0, 2.5, 5.0, 10.0])
    with pytest.raises(CorruptImageError, match="irregular slice spacing"):
        read_image(tmp_path / "gap")
    write_series(tmp_path / "dup", n=3, positions=[0.0, 2.5, 2.5])
    with pytest.raises(CorruptImageError, match="share a position"):
        read_image(tmp_path / "dup")
    uid = write_series(tmp_path / "mixed", n=3)
    ds = pydicom.dcmread(sorted((tmp_path / "mixed").iterdir())[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.1]  # slightly tilted: not the same plane
    ds.SeriesInstanceUID = uid
    ds.save_as(sorted((tmp_path / "mixed").iterdir())[0])
    # grouped apart by orientation: the odd slice is not mixed into the stack
    assert len(list_series(tmp_path / "mixed").series) == 2
    assert read_image(tmp_path / "mixed").array.shape[0] == 2


def test_bad_file_in_a_folder_is_reported_and_the_rest_read(tmp_path):
    write_series(tmp_path / "s", n=3)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    report = describe_path(tmp_path / "s")
    assert report["usable"] and report["image"]["shape"] == [3, 128, 128]
    assert [p["file"] for p in report["unreadable_files"]] == ["notes.txt"]
    text = json.dumps(report)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert str(ds.PatientName) not in text and str(ds.PatientID) not in text


def test_info_cli_exit_codes(tmp_path, capsys):
    write_series(tmp_path / "s", n=3)
    assert main(["info", str(tmp_path / "s")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"]["reason"] and out["image"]["units"] == "HU"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_text("nope")
    assert main(["info", str(tmp_path / "junk")]) == 1
    assert "no image series" in capsys.readouterr().out


def _enhanced(tmp_path, positions):
    """An enhanced-CT-like multi-frame file with per-frame positions and shared rescale."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    n = len(positions)
    frames = np.stack([np.full((ds.Rows, ds.Columns), 10 * k, np.int16) for k in range(n)])
    ds.NumberOfFrames = n
    ds.PixelData = frames.tobytes()
    shared = Dataset()
    pm, po, pv = Dataset(), Dataset(), Dataset()
    pm.PixelSpacing, pm.SliceThickness = [0.5, 0.5], 1.0
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 2, -1000, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for z in positions:
        item, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = Sequence([pp])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    for key in ("RescaleIntercept", "RescaleSlope", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, key)
    p = tmp_path / "enhanced.dcm"
    ds.save_as(p)
    return p


def test_enhanced_multiframe_geometry_and_rescale_from_functional_groups(tmp_path):
    p = _enhanced(tmp_path, [4.0, 0.0, 2.0])  # stored out of order
    scan = read_image(p)
    assert scan.array.shape == (3, 128, 128)
    # frames re-ordered by position: stored values 10, 20, 0 at z = 0, 2, 4 -> sorted 10, 20, 0
    np.testing.assert_allclose(scan.array[:, 0, 0], [10 * 2 - 1000, 20 * 2 - 1000, 0 * 2 - 1000])
    assert scan.spacing == pytest.approx((2.0, 0.5, 0.5))
    with pytest.raises(CorruptImageError, match="irregular"):
        read_image(_enhanced(tmp_path, [0.0, 1.0, 5.0]))


def test_monochrome1_inverted_and_voi_window_kept(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 600, 400
    p = tmp_path / "m1.dcm"
    ds.save_as(p)
    scan = read_image(p)
    raw = ds.pixel_array.astype(np.float32)
    lo, hi = -(2**15), 2**15 - 1  # BitsStored 16, signed
    np.testing.assert_allclose(scan.array, lo + hi - raw)
    assert scan.window == (lo + hi - 600, 400)
    assert any("MONOCHROME1" in n for n in scan.notes)


def test_declared_size_beyond_the_file_refused_before_allocating(tmp_path):
    import nibabel as nib

    p = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), p)
    raw = bytearray(p.read_bytes())
    raw[42:48] = np.array([4000, 4000, 4000], "<i2").tobytes()  # dim[1..3]
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptImageError, match="huge.nii.*declares"):
        read_image(p)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 10
    q = tmp_path / "huge.dcm"
    ds.save_as(q)
    with pytest.raises(InputTooLargeError, match="huge.dcm.*memory budget"):
        read_image(q)
