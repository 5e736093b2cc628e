"""`medtl evaluate` on a tiny run: report, model card, and its own decision, used by predictions when asked."""

import json
import re
import shutil

import numpy as np

from medtl.cli import main
from medtl.predict.predictor import load_run


def test_evaluate_writes_report_card_and_a_decision_used_when_asked(tiny_run, sample_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    image = sample_dir / "dicom" / "img_0003.dcm"
    trained = load_run(run)
    t_train = trained.decision.temperature  # `medtl train` calibrates on validation already
    assert t_train is not None and trained.decision.threshold is not None
    before = trained.predict(image)
    weights = (run / "model.safetensors").read_bytes()
    assert main(["evaluate", str(run), "--boot", "50", "--methods", "gradcam", "--no-data-randomisation"]) == 0
    assert "test AUC" in capsys.readouterr().out
    out = run / "evaluation"
    html = (out / "report.html").read_text()
    assert "Test AUC" in html and "data:image/png;base64" in html and "not for diagnosis" in html
    assert "<img" in html and "src=\"http" not in html  # self-contained
    card = json.loads((out / "model_card.json").read_text())
    assert card["intended_use"] and card["known_limits"] and card["metrics"]["test_auc"] is not None
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # (base64 can spell anything)
    assert "SYN" not in text and "SYN" not in (out / "model_card.md").read_text()  # no patient identifiers
    result = json.loads((out / "evaluation.json").read_text())
    t = result["calibration"]["temperature"]
    assert (run / "model.safetensors").read_bytes() == weights  # the weights are written once, by training
    unchanged = load_run(run).predict(image)  # predictions keep the training decision
    assert unchanged.probabilities == before.probabilities and unchanged.label == before.label
    assert unchanged.decision_source == "training"
    predictor = load_run(run, decision="evaluation")  # unless the evaluation's is asked for
    assert (
        predictor.decision.temperature == t and predictor.decision.threshold == result["operating_point"]["threshold"]
    )
    after = predictor.predict(image)
    assert after.decision_source == "evaluation" and after.threshold == predictor.decision.threshold
    # calibrated probabilities are softmax(z / T) of the same logits: softmax(log p * T_train / T) of the
    # probabilities calibrated at training
    raw = np.log(np.array(list(before.probabilities.values()))) * t_train
    expected = np.exp(raw / t) / np.exp(raw / t).sum()
    np.testing.assert_allclose(list(after.probabilities.values()), expected, rtol=1e-4, atol=1e-6)
    assert abs(t - 1) > 1e-3, t  # the tiny run is miscalibrated enough to move: the check above is not trivial


def test_run_metrics_and_evaluate_report_the_same_test_auc(tiny_run, tmp_path):
    """One prediction path: the test AUC that training wrote and the one `medtl evaluate` measures agree."""
    from medtl.eval.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    written = json.loads((run / "metrics.json").read_text())["test"]["auc"]
    measured = evaluate_run(run, n_boot=20, methods=(), data_randomisation=False)["auc"]["auc"]
    assert measured == written


def test_the_report_and_card_are_rendered_from_templates_and_escape_html(tmp_path):
    from medtl.eval.card import report_html

    result = {
        "run": "<script>x</script>",
        "date": "2026-11-28",
        "data": "d.csv",
        "n_test_images": 4,
        "n_test_patients": 2,
        "auc": {"auc": 0.75, "auc_ci": [0.5, 1.0], "resampled": "patients", "n_boot": 10},
        "calibration": {
            "temperature": 1.5,
            "val_nll_before": 0.7,
            "val_nll_after": 0.6,
            "test_ece_before": 0.2,
            "test_ece_after": 0.1,
            "test_ece_after_ci": [0.05, 0.3],
        },
        "subgroups": {"site": [{"value": "A", "n": 2, "auc": None}]},
        "saliency_sanity": [],
    }
    card = {"encoder": "efficientnet_lite0", "version": "0.1.0", "known_limits": ["small <test> set"]}
    html = report_html(result, card, {"roc": b"\x89PNG"})
    assert "<script>x</script>" not in html and "&lt;script&gt;" in html and "small &lt;test&gt; set" in html
    assert "Test AUC 0.750 (95% CI 0.500–1.000)" in html and 'src="data:image/png;base64,iVBORw=="' in html
    assert "<td>site</td><td>A</td><td>2</td><td>n/a</td>" in html


def test_a_subgroup_without_both_classes_renders_without_an_auc():
    from medtl.eval.card import report_html

    result = {
        "run": "r",
        "date": "2026-11-28",
        "data": "d.csv",
        "n_test_images": 4,
        "n_test_patients": 2,
        "auc": {"auc": 0.75, "auc_ci": None, "resampled": "patients", "n_boot": 10},
        "calibration": {
            "temperature": 1.0,
            "val_nll_before": 0.7,
            "val_nll_after": 0.6,
            "test_ece_before": 0.2,
            "test_ece_after": 0.1,
            "test_ece_after_ci": None,
        },
        "subgroups": {"site": [{"value": "A", "n": 2}, {"value": "B", "n": 2, "auc": 0.5, "auc_ci": None}]},
        "saliency_sanity": [],
    }
    html = report_html(result, {"encoder": "e", "version": "0", "known_limits": []}, {})
    assert "<td>site</td><td>A</td><td>2</td><td>n/a</td>" in html and "<td>B</td><td>2</td><td>0.500</td>" in html


def test_evaluate_by_default_checks_the_cheap_maps_and_reports_its_progress(tiny_run, tmp_path, caplog, capsys):
    """Defaults: the gradient CAMs (and the run's own method) checked, no shuffled-label retraining, and each
    phase logged with the time so far and, once a phase has finished, an estimate of the time left."""
    import logging

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with caplog.at_level(logging.INFO, logger="medtl.eval"):
        assert main(["evaluate", str(run), "--boot", "20"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert [s["method"] for s in result["saliency_sanity"]] == ["gradcam", "gradcampp"]
    assert all(s["data_randomisation"] is None for s in result["saliency_sanity"])
    scope = result["saliency_sanity_scope"]
    assert scope["not_checked"] == ["occlusion", "integrated_gradients"] and "opt in" in scope["data_randomisation"]
    assert "not checked: occlusion, integrated_gradients" in out and "data randomisation test not run" in out
    html = (run / "evaluation" / "report.html").read_text()
    assert "Not checked: occlusion, integrated_gradients" in html and "--data-randomisation" in html
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation [")]
    steps = [re.match(r"evaluation \[(\d+)/(\d+)\] ([^(:]+)", line).groups() for line in lines]
    assert [int(k) for k, _, _ in steps] == list(range(1, 8)) and {n for _, n, _ in steps} == {"7"}
    assert [name.strip() for _, _, name in steps] == [
        "predictions",
        "intervals",
        "test cases",
        "gradcam",
        "gradcampp",
        "out-of-distribution check",
        "figures and report",
    ]
    assert "left)" not in lines[0] and all("left)" in line for line in lines[1:])
    assert any(r.getMessage().startswith("evaluation done in") for r in caplog.records)


def test_evaluate_refuses_an_unknown_method_before_any_work(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--methods", "gradcam,shap"]) == 2
    assert "shap" in capsys.readouterr().err
