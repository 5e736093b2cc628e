import numpy as np
from PIL import Image

from medtl.inference import load_run
from ui.app import analyse, create_app, find_runs


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
