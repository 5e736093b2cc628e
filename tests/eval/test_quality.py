"""The model's quality beside every answer: figures from the evaluation or the training run, badges, the floor."""

from __future__ import annotations

import json

import pytest

from medtl.errors import ConfigError
from medtl.eval.quality import ModelQuality, hanley_mcneil_ci, model_quality, quality_floor
from medtl.run import RunDir


def test_hanley_mcneil_interval_by_hand():
    # AUC 0.8, 50 + 50 cases: Q1 = 0.8 / 1.2, Q2 = 2 * 0.64 / 1.8; variance (0.16 + 49 (Q1 - 0.64) + 49 (Q2 - 0.64))
    # / 2500 = 0.001980, SE 0.04450 (Hanley & McNeil 1982, equation 2)
    lo, hi = hanley_mcneil_ci(0.8, 50, 50)
    assert (hi - lo) / (2 * 1.96) == pytest.approx(0.04450, abs=5e-5) and (lo + hi) / 2 == pytest.approx(0.8)
    assert hanley_mcneil_ci(0.5, 2, 2)[0] == 0.0
    lo, hi = hanley_mcneil_ci(1.0, 3, 3)  # a perfect score on 6 cases: not an interval of zero width
    assert hi == 1.0 and lo < 0.9


def _run(tmp_path, metrics=None, evaluation=None):
    run = tmp_path / "run"
    (run / RunDir.EVALUATION).mkdir(parents=True)
    if metrics is not None:
        (run / RunDir.METRICS).write_text(json.dumps(metrics))
    if evaluation is not None:
        (run / RunDir.EVALUATION / RunDir.EVALUATION_RECORD).write_text(json.dumps(evaluation))
    return run


DEMO = {  # the demo model of the issue: test AUC 0.645 on 11 patients (21 images: 11 + 10)
    "test": {
        "auc": 0.645,
        "n_patients": 11,
        "label_counts": {"no lesion": 11, "lesion": 10},
        "decision": {"threshold": 0.4, "positive": "lesion", "sensitivity": 0.7, "specificity": 0.727},
    }
}


def test_a_coin_flip_model_is_not_fit_and_says_so_with_its_badges(tmp_path):
    q = model_quality(_run(tmp_path, DEMO), "lesion", floor=0.6)
    assert not q.fit and not q.evaluated and q.small
    assert q.badges() == ["NOT FIT TO SHOW ANSWERS", "NOT EVALUATED", "SMALL TEST SET (11 patients)"]
    text = q.summary()
    assert "Test AUC 0.65 (95 % CI 0.4" in text and "approximate" in text
    assert "sensitivity 0.70 and specificity 0.73 for lesion" in text and "11 test patients" in text
    assert "not fit to show answers" in q.not_fit_text() and "0.60" in q.not_fit_text()
    assert model_quality(_run(tmp_path / "b", DEMO), "lesion", floor=0).fit  # 0 turns the floor off


def test_an_evaluated_model_shows_the_evaluation_s_interval_and_finding(tmp_path):
    evaluation = {
        "auc": {"auc": 0.93, "auc_ci": [0.88, 0.97]},
        "n_test_patients": 156,
        "operating_point": {"positive": "malignant", "sensitivity": 0.81, "specificity": 0.9},
    }
    q = model_quality(_run(tmp_path, DEMO, evaluation), floor=0.6)
    assert q.fit and q.evaluated and not q.small and q.badges() == []
    assert q.summary().startswith("Test AUC 0.93 (95 % CI 0.88–0.97, patient bootstrap)")
    assert "for malignant" in q.summary() and "156 test patients" in q.summary()


def test_a_run_without_figures_is_not_judged_but_badged(tmp_path):
    q = model_quality(_run(tmp_path), floor=0.6)
    assert q.fit and q.badges() == ["NOT EVALUATED"] and "No test figures" in q.sentence()
    assert ModelQuality(auc=0.9, auc_ci=(0.55, 0.99), floor=0.6).badges()[0] == "NOT FIT TO SHOW ANSWERS"


def test_the_floor_comes_from_the_environment_and_a_bad_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("MEDTL_QUALITY_FLOOR", "0.7")
    assert quality_floor() == 0.7 and quality_floor(0.5) == 0.5
    monkeypatch.delenv("MEDTL_QUALITY_FLOOR")
    assert quality_floor() == 0.6
    monkeypatch.setenv("MEDTL_QUALITY_FLOOR", "high")
    with pytest.raises(ConfigError, match="MEDTL_QUALITY_FLOOR='high' is not a number"):
        quality_floor()
