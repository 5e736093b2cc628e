"""`medtl evaluate` on a tiny run: report, model card, and calibration carried into predictions."""

import json
import re
import shutil

from medtl.cli import main
from medtl.inference import load_run


def test_evaluate_writes_report_card_and_calibrates_the_run(tiny_run, sample_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    image = sample_dir / "dicom" / "img_0003.dcm"
    before = load_run(run).predict(image)
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
    predictor = load_run(run)
    assert predictor.temperature == t and predictor.operating_point["threshold"] == \
        result["operating_point"]["threshold"]
    after = predictor.predict(image)
    if abs(t - 1) > 1e-3:
        assert after.probabilities != before.probabilities
