"""The Decision: the one place a class is chosen, and what every caller's answer is made of."""

import csv

import numpy as np

from medtl.predict import Decision, Logits
from medtl.predict.predictor import load_run


def test_a_binary_decision_at_its_operating_point_differs_from_the_argmax():
    d = Decision(("no lesion", "lesion"), temperature=2.0, threshold=0.3, rule="youden")
    probs = np.array([[0.65, 0.35], [0.8, 0.2], [0.4, 0.6]])
    assert d.choose(probs).tolist() == [1, 0, 1]  # 0.35 >= 0.3: lesion, though "no lesion" is more probable
    assert d.label(probs[0]) == "lesion" and d.basis == "operating point"
    assert Decision(("no lesion", "lesion")).choose(probs).tolist() == [0, 0, 1]  # without one: the argmax
    [j] = d.judgements({"no lesion": 0.65, "lesion": 0.35})
    assert j.name == "lesion" and j.decided and j.comparison() == "0.35 ≥ 0.30"
    close = Decision(("a", "b"), threshold=0.52).judgements({"a": 0.4801, "b": 0.5199})[0]
    assert close.comparison() == "0.5199 < 0.5200"  # never "0.52 < 0.52"


def test_the_temperature_calibrates_probabilities_and_multi_label_decides_each_finding():
    z = np.array([[2.0, -1.0]], dtype=np.float32)
    np.testing.assert_allclose(
        Decision(("a", "b"), temperature=2.0).probabilities(z)[0],
        np.exp([1.0, -0.5]) / np.exp([1.0, -0.5]).sum(),
        rtol=1e-6,
    )
    m = Decision(("effusion", "nodule"), multi_label=True, thresholds=(0.4, 0.9))
    assert m.findings(np.array([0.5, 0.8])) == ["effusion"] and m.label(np.array([0.5, 0.8])) == "effusion"
    assert m.label(np.array([0.1, 0.1])) == "No Finding" and m.basis == "operating points"
    assert Decision(("effusion", "nodule"), multi_label=True).finding_thresholds == (0.5, 0.5)


def test_a_decision_survives_its_record_and_ignores_a_threshold_that_does_not_apply():
    d = Decision(("a", "b"), temperature=1.5, threshold=0.4, rule="youden", source="evaluation")
    again = Decision.from_record(
        d.class_names, False, **{k: v for k, v in d.to_record().items() if k != "source"}, source="evaluation"
    )
    assert again == d
    three = Decision.from_record(("a", "b", "c"), False, 1.0, {"threshold": 0.4, "rule": "x"})
    assert three.threshold is None and three.basis == "argmax"  # a binary threshold means nothing for 3 classes


def test_fit_chooses_the_temperature_and_threshold_on_validation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    z = (2 * y - 1) * 3.0 + rng.normal(0, 2, 300)  # true log-odds 1.5 z: logits of 4 z are too confident
    logits = np.stack([np.zeros(300), 4 * z], 1).astype(np.float32)
    d = Decision.fit(Logits(y, logits, np.arange(300)), ["neg", "pos"])
    assert 2 < d.temperature < 3.5 and 0 < d.threshold < 1 and "Youden" in d.rule and d.source == "training"
    assert Decision.fit(Logits(y, logits, np.arange(300)), ["neg", "pos"], source="evaluation").source == "evaluation"


def test_an_overlay_names_the_class_medtl_predict_answers(tiny_run, sample_dir):
    """Training's overlays and the Predictor decide through the same Decision (calibrated, at the operating
    point), so an overlay's label is the one `medtl predict` gives for that image."""
    predictor = load_run(tiny_run, device="cpu")
    overlays = sorted((tiny_run / "overlays").glob("test_*_pred-*.png"))
    test_images = [r["image"] for r in csv.DictReader(open(tiny_run / "splits.csv")) if r["split"] == "test"]
    assert overlays
    for k, overlay in enumerate(overlays):
        said = overlay.stem.split("_pred-", 1)[1]
        assert predictor.predict(test_images[k], check=False).label == said, overlay.name


def test_a_positive_first_class_is_decided_and_judged_on_its_own_probability():
    """BreastMNIST lists its finding (malignant) first: the threshold is on P(malignant), not on the other class."""
    d = Decision(("malignant", "normal, benign"), threshold=0.3, positive=0)
    probs = np.array([[0.35, 0.65], [0.25, 0.75]])
    assert d.choose(probs).tolist() == [0, 1]  # 0.35 >= 0.3: malignant; 0.25 < 0.3: normal, benign
    assert [d.label(p) for p in probs] == ["malignant", "normal, benign"]
    j = d.judgements({"malignant": 0.35, "normal, benign": 0.65})[0]
    assert (j.name, j.threshold, j.decided) == ("malignant", 0.3, True)
    assert "probability of malignant" in d.describe() and d.finding == "malignant"
    yb, pb = d.positive_view(np.array([0, 1]), probs)
    assert yb.tolist() == [1, 0] and pb.tolist() == [0.35, 0.25]


def test_the_positive_class_survives_the_record_and_an_old_record_means_the_second_class():
    d = Decision(("malignant", "benign"), temperature=1.2, threshold=0.4, rule="youden", positive=0)
    record = d.to_record()
    assert record["operating_point"]["positive"] == "malignant"
    again = Decision.from_record(("malignant", "benign"), False, 1.2, record["operating_point"])
    assert again.positive == 0 and again.finding == "malignant"
    old = Decision.from_record(("no lesion", "lesion"), False, 1.0, {"threshold": 0.4, "rule": "x"})
    assert old.positive == 1 and old.finding == "lesion"


def test_a_decision_fitted_for_the_first_class_is_the_mirror_of_the_second():
    """Fitted with positive 0 on the same logits, the threshold is on P(class 0) and gives the same answers as
    one fitted on class 1 wherever the two are not tied."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    logits = np.stack([np.zeros(300), (y * 2 - 1) + rng.normal(0, 1.2, 300)], axis=1).astype(np.float32)
    first = Decision.fit(Logits(y, logits, np.arange(300)), ["a", "b"], positive="a")
    second = Decision.fit(Logits(y, logits, np.arange(300)), ["a", "b"])
    assert first.positive == 0 and first.operating_point["positive"] == "a"
    p = first.probabilities(logits)
    agree = (first.choose(p) == second.choose(p)).mean()
    assert agree > 0.95  # (the smoothed ROC picks each side's point on its own)
