"""The out-of-distribution detector: scores, threshold, saving, and refusals through the run's Predictor."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medtl.cli import main
from medtl.predict.ood import OOD_FILE, OODDetector, foreign_check, study_scores, tolerance_threshold
from medtl.predict.predictor import load_run


def _clusters(seed=0, n=200, d=32):
    """Non-negative features (as pooled activations are) of two classes, active on the first half of the
    dimensions."""
    g = torch.Generator().manual_seed(0)
    centres = torch.zeros(2, d)
    centres[:, : d // 2] = torch.rand(2, d // 2, generator=g) * 3 + 1
    labels = torch.arange(n) % 2
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)) * 0.3
    return (centres[labels] + noise).clamp_min(0), labels, centres


def _foreign(n=200, d=32, seed=6):
    """Features of another kind of image: active on the other half of the dimensions."""
    f = torch.zeros(n, d)
    f[:, d // 2 :] = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    return f


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_far_features_score_higher_and_the_threshold_holds_on_new_in_distribution_data(method, tmp_path):
    train, labels, _ = _clusters(0)
    val, _, _ = _clusters(1)
    det = OODDetector.fit(train, labels, method).calibrate(OODDetector.fit(train, labels, method).score(val))
    new_in, _, _ = _clusters(5, n=2000)
    far = _foreign()
    s_in, s_far = det.score(new_in), det.score(far)
    assert np.mean(s_in > det.threshold) < 0.05  # about 1 % by design; the tolerance bound errs wide
    assert np.mean(s_far > det.threshold) > 0.95
    det.save(tmp_path / "ood.safetensors")
    back = OODDetector.load(tmp_path / "ood.safetensors")
    assert back.method == method and back.threshold == det.threshold
    np.testing.assert_allclose(back.score(far), s_far, rtol=1e-6)


def test_tolerance_threshold_widens_small_samples_and_meets_the_quantile_on_large_ones():
    rng = np.random.default_rng(0)
    small = rng.lognormal(0, 0.2, 10)
    assert tolerance_threshold(small, 0.99) > np.quantile(small, 0.99)  # 10 scores: wider than their maximum
    big = rng.lognormal(0, 0.2, 100_000)
    true_q = float(np.exp(0.2 * 2.3263))  # the lognormal's 99th percentile
    assert abs(tolerance_threshold(big, 0.99) - true_q) / true_q < 0.02


def test_a_study_scores_the_median_of_its_inputs():
    assert study_scores(np.array([1.0, 5.0, 3.0, 9.0]), np.array([0, 0, 0, 1])).tolist() == [3.0, 9.0]


def test_the_run_refuses_foreign_files_and_predict_exits_3(tiny_run, sample_dir, tmp_path, capsys):
    assert (tiny_run / OOD_FILE).is_file()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["ood"]["method"] == "knn" and metrics["ood"]["n_val"] > 0
    predictor = load_run(tiny_run)
    noise = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(noise)
    refused = predictor.predict(noise)
    assert refused.refused and "does not look like" in refused.refused and refused.label is None
    answered = predictor.predict(noise, check=False)  # the caller may ask for an answer anyway
    assert answered.refused is None and answered.label in predictor.class_names
    good = sample_dir / "dicom" / "img_0001.dcm"
    assert predictor.predict(good).refused is None
    capsys.readouterr()
    assert main(["predict", str(tiny_run), str(good), str(noise)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("img_0001.dcm\t") and out[1].startswith("noise.png\tREFUSED\t")
    assert main(["predict", str(tiny_run), str(good)]) == 0
    result = foreign_check(predictor, np.asarray(predictor.ood.val_scores), [noise])
    assert result["auroc"] == 1.0 and result["foreign_refused"] == 1.0


def test_a_run_without_a_detector_still_answers(tiny_run, sample_dir, tmp_path):
    old = tmp_path / "old_run"  # a run trained before medtl kept a detector (and checksums)
    shutil.copytree(tiny_run, old)
    (old / OOD_FILE).unlink()
    (old / "SHA256SUMS").unlink()
    predictor = load_run(old)
    assert predictor.ood is None
    pred = predictor.predict(sample_dir / "dicom" / "img_0001.dcm")
    assert pred.refused is None and pred.ood_score is None


def test_evaluate_reports_the_detectors_auroc_against_foreign_files(tiny_run, tmp_path):
    from medtl.eval.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    noise = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)).save(noise)
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[..., 0] = 200
    Image.fromarray(photo).save(tmp_path / "red.jpg")
    result = evaluate_run(
        run, n_boot=20, methods=("gradcam",), data_randomisation=False, foreign=[noise, tmp_path / "red.jpg"]
    )
    ood = result["ood"]
    assert ood["measured"] and ood["n_foreign"] == 2 and ood["auroc"] is not None and ood["auroc"] > 0.9
    html = (run / "evaluation" / "report.html").read_text()
    assert 'id="ood"' in html and "AUROC" in html
    card = (run / "evaluation" / "model_card.md").read_text()
    assert "Inputs it refuses" in card and "AUROC" in card


def test_train_fits_the_decision_on_validation_and_reports_it(tiny_run):
    predictor = load_run(tiny_run)
    assert predictor.decision.temperature is not None and predictor.decision.temperature > 0
    assert predictor.decision.threshold is not None and "validation" in predictor.decision.rule
    decision = json.loads((tiny_run / "metrics.json").read_text())["test"]["decision"]
    assert 0 <= decision["balanced_accuracy"] <= decision["best_balanced_accuracy"] <= 1


def test_one_near_duplicate_validation_image_does_not_switch_the_detector_off():
    """A duplicated image scores about 0 (its twin is in the training set): the bound must not explode."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0.3, 0.02, 19)
    base = tolerance_threshold(scores)
    for low in (0.01, 0.0):
        assert tolerance_threshold(np.r_[scores, low]) < base * 1.2


def test_a_quantile_of_one_is_refused_when_the_config_is_read():
    from medtl.config import load_config
    from medtl.errors import ConfigError

    with pytest.raises(ConfigError, match="ood_quantile"):
        load_config(train={"ood_quantile": 1.0})
