import dataclasses

import numpy as np
from PIL import Image

from medtl.inference import load_run
from medtl_ui.app import analyse, create_app, find_runs


def test_dicom_nifti_and_png_uploads(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run)
    for path in [sample_dir / "dicom" / "img_0001.dcm", sample_dir / "nifti" / "vol_001.nii.gz"]:
        image, probs, overlay, message = analyse(predictor, str(path))
        assert image.ndim == 2 and overlay.shape == image.shape + (3,) and max(image.shape) >= 448
        assert set(probs) == set(predictor.class_names) and abs(sum(probs.values()) - 1) < 1e-5
        assert "Predicted class" in message
    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(png)
    image, probs, overlay, _ = analyse(predictor, str(png))
    assert abs(image.shape[0] / image.shape[1] - 40 / 50) < 0.01 and overlay.shape == image.shape + (3,)


def test_bad_upload_gets_a_message_not_a_trace(tiny_run, tmp_path):
    predictor = load_run(tiny_run)
    bad = tmp_path / "upload.dcm"
    bad.write_text("hello")
    image, probs, overlay, message = analyse(predictor, str(bad))
    assert image is None and probs is None and "Cannot use this file" in message and "upload.dcm" in message
    assert "Traceback" not in message and str(tmp_path) not in message
    assert "Upload" in analyse(predictor, None)[3]


def test_app_builds_for_a_run_or_a_folder_of_runs(tiny_run):
    assert find_runs(tiny_run) == [tiny_run]
    assert find_runs(tiny_run.parent) == [tiny_run]
    assert create_app(tiny_run.parent) is not None


def test_refusals_give_the_reason(tiny_run, sample_dir, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from medtl_ui.app import run_case

    predictor = load_run(tiny_run)
    assert predictor.input_record["modalities"] == ["CT"]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(blank)
    assert "blank" in analyse(predictor, str(blank))[3]
    rng = np.random.default_rng(0)
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[..., 0] = rng.integers(150, 255, (64, 64))  # strongly coloured: a photograph, not a scan
    photo[..., 2] = rng.integers(0, 60, (64, 64))
    Image.fromarray(photo).save(tmp_path / "cat.jpg")
    assert "colour image, and the model was trained on grey images only" in \
        analyse(predictor, str(tmp_path / "cat.jpg"))[3]
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.save_as(tmp_path / "mr.dcm")
    message = analyse(predictor, str(tmp_path / "mr.dcm"))[3]
    assert "trained on CT" in message and "MR" in message
    assert str(mr.PatientName) not in message
    predictor.input_record = {"modalities": ["CT"], "dimensions": [2]}
    message = analyse(predictor, str(sample_dir / "nifti" / "vol_001.nii.gz"))[3]
    assert "2D images only" in message
    image, probs, overlay, message, case = run_case(predictor, [str(sample_dir / "dicom" / "img_0001.dcm")])
    assert case is not None and "Predicted class" in message


def test_several_files_of_a_series_and_a_zip_are_read_as_one_scan(tiny_run, tmp_path):
    import zipfile

    from medtl.data import create_sample_series
    from medtl_ui.app import export_report, run_case, slice_profile, window_slice

    series = create_sample_series(tmp_path / "series", n_slices=6, size=48)
    files = sorted(str(p) for p in series.iterdir())
    predictor = load_run(tiny_run)
    _, probs, overlay, message, case = run_case(predictor, files, workdir=tmp_path)
    assert case.scan.array.shape == (6, 48, 48) and "Predicted class" in message
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as z:
        for f in files:
            z.write(f, f.split("/")[-1])
    _, probs_zip, _, _, case_zip = run_case(predictor, str(tmp_path / "s.zip"), workdir=tmp_path)
    assert probs_zip == probs
    lung = window_slice(case.scan, 3, "lung")
    bone = window_slice(case.scan, 3, "bone")
    assert lung.dtype == np.uint8 and not np.array_equal(lung, bone)
    report = export_report(predictor, case, tmp_path)
    assert Image.open(report).size[0] > 800
    assert case.prediction.get("slice_scores") is None and slice_profile(case) is None  # "middle": one input
    scores = [0.1, 0.2, 0.9, 0.3, 0.2, 0.1]  # a volume read slice by slice: the profile is drawn
    profile = slice_profile(dataclasses.replace(case, prediction={**case.prediction, "slice_scores": scores},
                                                slice_index=2))
    assert profile.ndim == 3 and profile.shape[2] == 3 and profile.shape[1] > 300
    flat = slice_profile(dataclasses.replace(case, prediction={**case.prediction, "slice_scores": [0.5] * 6},
                                             slice_index=2))  # the same slice marked: only the scores differ
    assert not np.array_equal(profile, flat)  # the plot follows the scores
