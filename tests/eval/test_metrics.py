"""Metrics against scikit-learn and direct computations on fixed inputs."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medtl.errors import MedtlInputError
from medtl.eval import (
    aggregate_by_group,
    bootstrap_ci,
    choose_threshold,
    compute_auc,
    compute_auc_ci,
    compute_binary_metrics,
    compute_ece,
    compute_nll,
    fit_temperature,
)

LABELS = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.55, 0.7, 0.3])
PROBS = np.stack([1 - SCORES, SCORES], axis=1)


def test_auc_matches_sklearn_and_refuses_bad_input():
    assert compute_auc(LABELS, PROBS) == pytest.approx(roc_auc_score(LABELS, SCORES))
    with pytest.raises(MedtlInputError, match="labels but scores"):
        compute_auc(LABELS[:-1], PROBS)
    bad = PROBS.copy()
    bad[0, 0] = np.nan
    with pytest.raises(MedtlInputError, match="NaN"):
        compute_auc(LABELS, bad)
    with pytest.raises(MedtlInputError, match="all 3 labels are class 1"):
        compute_auc([1, 1, 1], PROBS[:3], strict=True)


def test_bootstrap_ci_resamples_patients_like_a_direct_computation():
    groups = np.repeat(np.arange(5), 2)  # 5 patients, 2 images each
    ci = compute_auc_ci(LABELS, PROBS, groups, n_boot=300, seed=1)
    # the same resampling written out directly
    rng = np.random.default_rng(1)
    vals = []
    for _ in range(300):
        pick = rng.integers(0, 5, 5)
        idx = np.concatenate([np.where(groups == g)[0] for g in pick])
        if len(np.unique(LABELS[idx])) == 2:
            vals.append(roc_auc_score(LABELS[idx], SCORES[idx]))
    assert ci["auc_ci"] == pytest.approx((np.quantile(vals, 0.025), np.quantile(vals, 0.975)))
    assert ci["auc_ci"][0] <= ci["auc"] <= ci["auc_ci"][1] and ci["resampled"] == "patients"
    assert bootstrap_ci(lambda idx: None, groups, n_boot=10) is None


def test_ece_matches_a_direct_computation():
    conf = PROBS.max(1)
    correct = (PROBS.argmax(1) == LABELS).astype(float)
    bins = np.minimum((np.ceil(conf * 15) - 1).astype(int), 14)
    direct = sum(np.mean(bins == b) * abs(correct[bins == b].mean() - conf[bins == b].mean()) for b in np.unique(bins))
    assert compute_ece(LABELS, PROBS) == pytest.approx(direct)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert compute_ece([0, 1], perfect) == 0.0


def test_operating_points_chosen_on_validation():
    t, rule = choose_threshold(LABELS, SCORES, "youden")
    m = compute_binary_metrics(LABELS, SCORES, t)
    assert "Youden" in rule and m["sensitivity"] + m["specificity"] - 1 >= 0.6  # the empirical best is 0.8
    t, _ = choose_threshold(LABELS, SCORES, "sensitivity:1.0")
    assert compute_binary_metrics(LABELS, SCORES, t)["sensitivity"] == 1.0
    t, _ = choose_threshold(LABELS, SCORES, "specificity:1.0")
    assert compute_binary_metrics(LABELS, SCORES, t)["specificity"] == 1.0
    m = compute_binary_metrics(LABELS, SCORES, 0.5)
    assert m["confusion_matrix"] == [[4, 1], [1, 4]] and m["ppv"] == 0.8 and m["npv"] == 0.8
    with pytest.raises(MedtlInputError, match="unknown operating-point rule"):
        choose_threshold(LABELS, SCORES, "precision:0.9")


def test_smoothed_youden_cut_generalises_better_than_the_empirical_one():
    """On small validation sets the empirical best cut overfits; the smoothed ROC's cut does better on new data."""
    from sklearn.metrics import roc_curve

    def logistic(z):
        return 1 / (1 + np.exp(-z))

    smoothed, empirical = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        val_y = np.r_[np.zeros(15), np.ones(25)].astype(int)
        val_s = logistic(np.where(val_y == 1, rng.normal(1.0, 1.2, 40), rng.normal(-1.0, 1.2, 40)))
        test_y = np.r_[np.zeros(5000), np.ones(5000)].astype(int)
        test_s = logistic(np.where(test_y == 1, rng.normal(1.0, 1.2, 10000), rng.normal(-1.0, 1.2, 10000)))
        fpr, tpr, thr = roc_curve(val_y, val_s)
        t_emp = thr[int(np.argmax(tpr - fpr))]
        t_smooth, _ = choose_threshold(val_y, val_s, "youden")
        for t, out in ((t_smooth, smoothed), (t_emp, empirical)):
            m = compute_binary_metrics(test_y, test_s, t)
            out.append(m["sensitivity"] + m["specificity"] - 1)
    assert np.mean(smoothed) > np.mean(empirical) + 0.005, (np.mean(smoothed), np.mean(empirical))


def test_patient_level_aggregation():
    labels, probs, keys = aggregate_by_group([0, 0, 1], np.array([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]]), ["a", "a", "b"])
    assert keys == ["a", "b"] and labels.tolist() == [0, 1] and probs[0] == pytest.approx([0.7, 0.3])
    with pytest.raises(MedtlInputError, match="different labels"):
        aggregate_by_group([0, 1], PROBS[:2], ["a", "a"])


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    true_logit = (labels * 2 - 1) * 1.0 + rng.normal(0, 1.5, 400)  # a weak signal...
    logits = np.stack([-true_logit, true_logit], 1) * 4.0  # ...reported 4x too confidently
    t = fit_temperature(logits, labels)
    before = compute_nll(labels, torch.softmax(torch.tensor(logits), 1).numpy())
    after = compute_nll(labels, torch.softmax(torch.tensor(logits / t), 1).numpy())
    assert t > 2 and after < before


def test_binary_rates_count_as_scikit_learn_does():
    """The bootstrap's cheap counting gives scikit-learn's figures, one-class resamples included."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    from medtl.metrics import binary_rates

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30):
        for _ in range(40):
            y = rng.integers(0, 2, n) if rng.random() < 0.7 else np.full(n, rng.integers(0, 2))
            scores, t = rng.random(n), float(rng.random())
            pred = (scores >= t).astype(int)
            rates = binary_rates(y, scores, t)
            tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
            assert rates["sensitivity"] == (tp / (tp + fn) if tp + fn else None)
            assert rates["specificity"] == (tn / (tn + fp) if tn + fp else None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert rates["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
