"""Multi-label tasks end to end: reading findings, splitting, training a sigmoid head, metrics per finding,
decisions per finding, saliency per finding, the evaluation report, DICOM results and the web page."""

import csv
import json

import numpy as np
import pydicom
import pytest

from medtl.config import load_config
from medtl.data import create_multilabel_sample, read_dataset, split_by_patient
from medtl.data.split import check_split_classes, kfold_by_patient
from medtl.errors import ManifestError, MedtlInputError
from medtl.metrics import compute_auc, compute_ece, compute_multilabel_metrics, fit_temperature
from medtl.predict.forward import forward_logits
from medtl.predict.post import Decision, Logits
from medtl.predict.predictor import load_run
from medtl.train import run_experiment


def _config(manifest, **train):
    return load_config(
        data={"path": str(manifest), "augment": False},
        encoder={"input_size": 64},
        train={"epochs": 1, "frozen_epochs": 1, "batch_size": 8, **train},
        explain={"n_overlays": 2},
    )


@pytest.fixture(scope="module")
def multilabel_data(tmp_path_factory):
    return create_multilabel_sample(tmp_path_factory.mktemp("ml") / "data", n_patients=120, size=48, seed=3)


@pytest.fixture(scope="module")
def multilabel_run(multilabel_data, tmp_path_factory):
    return run_experiment(_config(multilabel_data), tmp_path_factory.mktemp("mlrun") / "run")


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_findings_column_is_read_as_one_row_of_zeros_and_ones(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    m = read_dataset(
        _write(
            tmp_path / "m.csv",
            ["image", "findings", "patient_id"],
            [
                ["0.png", "effusion|nodule", "p0"],
                ["1.png", "No Finding", "p1"],
                ["2.png", " nodule ", "p2"],
                ["3.png", "", "p3"],
                ["4.png", "effusion|mass", "p4"],
            ],
        )
    )
    assert m.multi_label and m.class_names == ["effusion", "mass", "nodule"]
    assert [r["label"] for r in m.records] == [(1, 0, 1), (0, 0, 0), (0, 0, 1), (1, 1, 0)]
    assert m.label_counts() == {"effusion": 2, "mass": 1, "nodule": 2}
    assert len(m.problems) == 1 and "row 5" in m.problems[0].where and "findings missing" in m.problems[0].reason
    # data.classes restricts and orders the findings; a row naming another is reported and skipped
    m = read_dataset(tmp_path / "m.csv", classes=("nodule", "effusion"))
    assert m.class_names == ["nodule", "effusion"] and [r["label"] for r in m.records] == [(1, 1), (0, 0), (1, 0)]
    assert any("'mass' is not one of data.classes" in p.reason for p in m.problems)


def test_label_columns_take_zero_or_one_and_report_the_rest(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    path = _write(
        tmp_path / "m.csv",
        ["image", "patient_id", "Edema", "Effusion"],
        [["0.png", "a", "1", "0"], ["1.png", "b", "-1", "1"], ["2.png", "c", "0.0", "true"]],
    )
    m = read_dataset(path, label_columns=("Effusion", "Edema"))
    assert m.multi_label and m.class_names == ["Effusion", "Edema"]
    assert [r["label"] for r in m.records] == [(0, 1), (1, 0)]
    assert "column 'Edema': '-1' is not 0 or 1" in m.problems[0].reason
    with pytest.raises(ManifestError, match="missing column.*Cardiomegaly"):
        read_dataset(path, label_columns=("Cardiomegaly",))


def test_medmnist_multilabel_file_keeps_its_columns(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_{k}": (rng.integers(0, 255, (6, 8, 8), dtype=np.uint8) if k == "images" else rng.integers(0, 2, (6, 14)))
        for s in ("train", "val", "test")
        for k in ("images", "labels")
    }
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    m = read_dataset(tmp_path / "chestmnist.npz")
    assert m.multi_label and m.class_names[:3] == ["atelectasis", "cardiomegaly", "effusion"]
    assert m.records[0]["label"] == tuple(int(v) for v in arrays["train_labels"][0])
    arrays["val_labels"] = arrays["val_labels"][:, :3]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ManifestError, match="val: multi-label labels of shape"):
        read_dataset(tmp_path / "bad.npz")


def test_split_is_by_patient_and_every_part_has_each_finding_both_ways():
    rng = np.random.default_rng(1)
    patients = np.repeat([f"p{i}" for i in range(60)], 2)
    per_patient = np.stack([rng.random(60) < 0.5, rng.random(60) < 0.2, rng.random(60) < 0.35], 1).astype(int)
    labels = np.repeat(per_patient, 2, axis=0)
    parts = split_by_patient(labels, patients, seed=0)
    seen = [set(patients[idx]) for idx in parts.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for idx in parts.values():
        assert (labels[idx].sum(0) > 0).all() and (labels[idx].sum(0) < len(idx)).all()
    check_split_classes(labels, parts, 3)
    rare = labels.copy()
    rare[:, 1] = 0
    rare[:2, 1] = 1  # one patient has the finding: a part must lack it
    with pytest.raises(MedtlInputError, match="positive or negative examples of finding"):
        split_by_patient(rare, patients, seed=0)
    with pytest.raises(MedtlInputError, match="finding index 1 has 1 patients"):
        kfold_by_patient(rare, patients, k=5)


def test_multilabel_metrics_are_per_finding():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.array([[0.9, 0.2], [0.2, 0.7], [0.6, 0.25], [0.1, 0.3]])
    m = compute_multilabel_metrics(y, p, ["a", "b"], thresholds=[0.5, 0.5])
    assert m["per_label"]["a"]["auc"] == 1.0 and m["per_label"]["b"]["auc"] == 0.75
    assert m["auc"] == compute_auc(y, p) == 0.875
    assert m["per_label"]["b"]["sensitivity"] == 0.5 and m["per_label"]["b"]["specificity"] == 1.0
    assert m["exact_match"] == 0.75
    assert compute_ece(y, p) == pytest.approx(
        np.mean([compute_ece(y[:, k], np.stack([1 - p[:, k], p[:, k]], 1)) for k in range(2)])
    )


def test_temperature_and_thresholds_are_fitted_per_finding_on_validation():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 2)) < 0.4).astype(int)
    z = (2 * y - 1) * 1.5 + rng.normal(0, 1.0, y.shape)
    true_logits = 3 * z  # the log-odds of y given z (up to the prior's constant)
    t = fit_temperature(true_logits * 3, y)  # logits 3x too confident: T near 3
    assert 2.4 < t < 3.6
    decision = Decision.fit(Logits(y, (true_logits * 3).astype(np.float32), np.arange(400)), ["a", "b"])
    assert decision.multi_label and decision.temperature == pytest.approx(t)
    assert len(decision.thresholds) == 2 and all(0 < x < 1 for x in decision.thresholds)
    y[:, 1] = 0  # a finding the validation studies never show keeps 0.5, and says so
    decision = Decision.fit(Logits(y, true_logits.astype(np.float32), np.arange(400)), ["a", "b"])
    assert decision.thresholds[1] == 0.5 and "all of one kind" in decision.rules[1]


def test_multilabel_run_learns_each_finding_and_shuffled_rows_do_not(multilabel_data, tmp_path):
    cfg = _config(multilabel_data, strategy="linear_probe", epochs=20, frozen_epochs=0, ood="off")
    metrics = json.loads((run_experiment(cfg, tmp_path / "lp") / "metrics.json").read_text())
    assert metrics["multi_label"] and metrics["test"]["per_label"]["calcification"]["auc"] > 0.85
    assert metrics["test"]["auc"] > 0.72
    # the same data with each image's row of findings given to another image: nothing to learn
    rows = list(csv.DictReader(open(multilabel_data)))
    findings = np.random.default_rng(0).permutation([r["findings"] for r in rows])
    shuffled = multilabel_data.parent / "shuffled.csv"
    _write(
        shuffled,
        list(rows[0]),
        [[r["image"], f, r["patient_id"], r["modality"]] for r in rows for f in [findings[rows.index(r)]]],
    )
    cfg = _config(shuffled, strategy="linear_probe", epochs=20, frozen_epochs=0, ood="off")
    metrics = json.loads((run_experiment(cfg, tmp_path / "shuffled") / "metrics.json").read_text())
    assert metrics["test"]["auc"] < 0.68


def test_multilabel_run_decides_each_finding_and_explains_each(multilabel_run, multilabel_data):
    metrics = json.loads((multilabel_run / "metrics.json").read_text())
    names = metrics["class_names"]
    assert names == ["calcification", "lesion"] and set(metrics["test"]["per_label"]) == set(names)
    assert set(metrics["test"]["decision"]["thresholds"]) == set(names)
    assert set(metrics["train"]["label_counts"]) == set(names)
    predictor = load_run(multilabel_run)
    assert predictor.multi_label and len(predictor.decision.thresholds) == 2
    image = multilabel_data.parent / "dicom" / "img_0001.dcm"
    pred = predictor.predict(image, check=False)
    thresholds = dict(zip(names, predictor.decision.thresholds))
    assert pred.thresholds == thresholds
    assert pred.findings == [c for c in names if pred.probabilities[c] >= thresholds[c]]
    assert pred.label == ("|".join(pred.findings) or "No Finding")
    # independent sigmoids: the same as the logits' sigmoid at the run's temperature
    x, _ = predictor.inputs(predictor.read(image))
    z = (
        forward_logits(predictor.model, x, predictor.runtime) / predictor.decision.temperature
    )  # (at the run's precision)
    assert np.allclose([pred.probabilities[c] for c in names], z.sigmoid()[0].numpy(), atol=1e-4)
    maps = [predictor.explain(image, class_name=c, check=False) for c in names]
    assert [m.class_name for m in maps] == names
    assert not np.allclose(maps[0].saliency, maps[1].saliency)
    default = predictor.explain(image, check=False)
    assert default.class_name == max(pred.probabilities, key=pred.probabilities.get)
    # reloaded, the same answers
    again = load_run(multilabel_run).predict(image, check=False)
    assert again.probabilities == pytest.approx(pred.probabilities, abs=1e-6)
    with open(multilabel_run / "splits.csv") as f:
        labels = {r["label"] for r in csv.DictReader(f)}
    assert labels <= {"No Finding", "calcification", "lesion", "calcification|lesion"} and len(labels) == 4


def test_multilabel_evaluation_reports_each_finding(multilabel_run):
    from medtl.eval.evaluate import evaluate_run

    result = evaluate_run(multilabel_run, n_boot=50, methods=("gradcam",), sanity_images=1, data_randomisation=False)
    assert result["multi_label"] and set(result["per_label"]) == {"calcification", "lesion"}
    for row in result["per_label"].values():
        assert row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1]
        assert {"threshold", "sensitivity", "sensitivity_ci", "specificity", "ece_before", "ece_after"} <= set(row)
    html = (multilabel_run / "evaluation" / "report.html").read_text()
    assert 'id="per-label"' in html and "calcification" in html
    card = (multilabel_run / "evaluation" / "model_card.md").read_text()
    assert "each finding at its own threshold" in card and "lesion (" in card
    assert load_run(multilabel_run).multi_label  # evaluate re-saves the model: still multi-label


def test_multilabel_dicom_results_hold_every_finding(multilabel_run, multilabel_data, tmp_path):
    from medtl.clinical.dicom_results import write_dicom_results
    from tests.clinical.test_dicom_results import _groups, _number

    predictor = load_run(multilabel_run)
    written = write_dicom_results(predictor, multilabel_data.parent / "dicom" / "img_0002.dcm", tmp_path, check=False)
    sr = pydicom.dcmread(written[0])
    groups = _groups(sr)  # a TID 1501 measurement group per finding: its code, probability, threshold, presence
    assert [g["Finding"].ConceptCodeSequence[0].CodeMeaning for g in groups] == ["calcification", "Lesion"]
    pred = predictor.predict(multilabel_data.parent / "dicom" / "img_0002.dcm", check=False)
    for group, name, threshold in zip(groups, predictor.class_names, predictor.decision.finding_thresholds):
        assert _number(group["Certainty of Finding"]) == pytest.approx(100 * pred.probabilities[name], abs=1e-3)
        assert _number(group["Threshold Value"]) == pytest.approx(100 * threshold, abs=1e-3)
        evaluation = next(v for k, v in group.items() if k.lower() == name).ConceptCodeSequence[0].CodeMeaning
        assert evaluation == ("Present" if name in pred.findings else "Absent")


def test_multilabel_page_shows_each_finding_and_its_map(multilabel_run, multilabel_data, tmp_path):
    from medtl.predict.predictor import Prediction
    from medtl_ui.app import decision_text, explain_case, open_case

    predictor = load_run(multilabel_run)
    case, message = open_case(predictor, multilabel_data.parent / "dicom" / "img_0003.dcm", "gradcam")
    assert "Findings:" in message and "calcification" in message and "lesion" in message
    assert "Predicted class" not in message
    text = decision_text(predictor, Prediction(**case.prediction))
    assert text.count("≥") + text.count("<") == 2
    first = case.saliency.copy()
    other = next(c for c in predictor.class_names if c != predictor.default_target(Prediction(**case.prediction)))
    case.target = other
    explain_case(predictor, case, "gradcam")
    assert not np.allclose(first, case.saliency)
    assert (("gradcam", other, case.slice_index)) in case.maps
