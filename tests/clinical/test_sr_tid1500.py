"""The SR is a TID 1500 Measurement Report a viewer understands (issue 32, "Why" item 7 and build item 2): the
model as a device observer (TID 1004), SNOMED CT / DCM codes (a run's own codes from RUN/finding_codes.yaml, the
private scheme only as the fallback), the probability of the finding (not of the answered class) with its
threshold on the same scale, references to the source images and to the Secondary Capture, which references its
source; dciodvfy passes every output, identified, de-identified and put through ``medtl deid``."""

import dataclasses
import shutil

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.deid import Deidentifier
from medtl.clinical.dicom_results import UNSTATED_METHOD, write_study_results
from medtl.clinical.findings import CODES_FILE, SCHEME, finding_code, load_finding_codes
from medtl.clinical.sr import device_uid
from medtl.errors import ConfigError
from medtl.models.encoders import file_sha256
from medtl.predict.predictor import load_run
from tests.clinical.test_dicom_results import _comments, _dciodvfy_errors, _groups, _items, _number


def _source(sample_dir, k=2):
    return sorted((sample_dir / "dicom").glob("*.dcm"))[k]


def _code(item) -> tuple[str, str]:
    seq = item.ConceptCodeSequence[0] if "ConceptCodeSequence" in item else item.ConceptNameCodeSequence[0]
    return seq.CodingSchemeDesignator, seq.CodeValue


def test_the_sr_is_a_tid1500_report_of_a_device_observer(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    src = _source(sample_dir)
    sr_path, sc_path = write_study_results(predictor, src, tmp_path, check=False).files
    sr, sc, source = pydicom.dcmread(sr_path), pydicom.dcmread(sc_path), pydicom.dcmread(src)
    assert _code(sr) == ("DCM", "126000")  # Imaging Measurement Report
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    root = _items(sr)
    assert _code(root["Observer Type"]) == ("DCM", "121007")  # Device
    assert device_uid(file_sha256(tiny_run / "model.safetensors")) == root["Device Observer UID"].UID
    assert root["Device Observer Name"].TextValue == "medtl"
    assert root["Device Observer Manufacturer"].TextValue == "medtl"
    assert root["Device Observer Model Name"].TextValue == f"medtl {predictor.encoder}"
    assert _code(root["Procedure reported"]) == ("SCT", "363679005")
    [library_group] = root["Image Library"].ContentSequence
    [entry] = [i for i in library_group.ContentSequence if i.ValueType == "IMAGE"]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # the SC: referenced by the finding's group (and listed as evidence); it references its source image
    [group] = _groups(sr)
    illustration = group["Best illustration of finding"].ReferencedSOPSequence[0]
    assert illustration.ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert illustration.ReferencedSOPClassUID == sc.SOPClassUID
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, sc.SOPInstanceUID}
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert "DERIVED" in sc.ImageType and "CodingSchemeIdentificationSequence" not in sr  # (no private code used)
    for f in (sr_path, sc_path):
        assert _dciodvfy_errors(f) == [], f


def test_the_probability_is_the_findings_even_when_the_answer_is_the_other_class(tiny_run, sample_dir, tmp_path):
    """Issue 32 "Why" 7: the SR said 0.862 "probability of finding" for a "no lesion" answer, the probability of
    the answered class, beside a threshold that applies to P(lesion)."""
    predictor = load_run(tiny_run, device="cpu")
    predictor.decision = dataclasses.replace(predictor.decision, threshold=0.999)  # every answer: "no lesion"
    src = _source(sample_dir)
    pred = predictor.predict(src, check=False)
    assert pred.label == "no lesion" and pred.probabilities["no lesion"] > 0.0
    results = write_study_results(predictor, src, tmp_path, check=False)
    [group] = _groups(pydicom.dcmread(results.files[0]))
    assert _number(group["Certainty of Finding"]) == pytest.approx(100 * pred.probabilities["lesion"], abs=1e-3)
    assert _number(group["Certainty of Finding"]) != pytest.approx(100 * pred.probabilities["no lesion"], abs=1e-3)
    assert _number(group["Threshold Value"]) == pytest.approx(99.9)  # the same scale: percent
    assert group["Lesion"].ConceptCodeSequence[0].CodeMeaning == "Absent"
    assert results.record.answer == "no lesion" and results.record.probability == pred.probabilities["lesion"]


def _sr_with_codes(tiny_run, sample_dir, tmp_path, codes: str):
    """The SR of a copy of ``tiny_run`` whose RUN/finding_codes.yaml says ``codes``; (the run, the SR's path)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / CODES_FILE).write_text(codes)
    results = write_study_results(load_run(run, device="cpu"), _source(sample_dir), tmp_path / "out", check=False)
    return run, results.files[0]


def test_finding_codes_come_from_the_run_then_snomed_then_the_private_scheme(tiny_run, sample_dir, tmp_path):
    run, sr_path = _sr_with_codes(tiny_run, sample_dir, tmp_path, "lesion: SCT:126851005:Neoplasm of lung\n")
    [group] = _groups(pydicom.dcmread(sr_path))
    assert _code(group["Finding"]) == ("SCT", "126851005") and "Neoplasm of lung" in group
    assert _dciodvfy_errors(sr_path) == []
    # a class no standard code is known for: the private scheme, declared in the SR
    assert finding_code("lesion", 1, {}).scheme_designator == "SCT"
    assert (finding_code("Grade 3 thing", 2, {}).scheme_designator, finding_code("x", 2, {}).value) == (SCHEME, "2")
    (run / CODES_FILE).write_text("lesion: SCT:126851005:Neoplasm of lung\nno lesion: ANY\n")
    with pytest.raises(ConfigError, match=CODES_FILE) as caught:
        load_finding_codes(run)
    assert "SCHEME:CODE:Meaning" in str(caught.value)


def test_a_private_code_is_declared_and_passes(tiny_run, sample_dir, tmp_path):
    _, sr_path = _sr_with_codes(tiny_run, sample_dir, tmp_path, "lesion: 99MEDTL:L1:Site lesion\n")
    assert pydicom.dcmread(sr_path).CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == SCHEME
    assert _dciodvfy_errors(sr_path) == []


def test_identity_removed_without_a_method_gets_one_and_validates(tiny_run, sample_dir, tmp_path):
    """Issue 32 "Why" 7: a stored SR failed dciodvfy, PatientIdentityRemoved YES copied from its source without
    a DeidentificationMethod (Type 1C)."""
    ds = pydicom.dcmread(_source(sample_dir))
    ds.PatientIdentityRemoved = "YES"
    ds.save_as(tmp_path / "src.dcm")
    files = write_study_results(load_run(tiny_run, device="cpu"), tmp_path / "src.dcm", tmp_path / "out", check=False)
    for f in files.files:
        out = pydicom.dcmread(f)
        assert out.PatientIdentityRemoved == "YES" and out.DeidentificationMethod == UNSTATED_METHOD
        assert _dciodvfy_errors(f) == [], f


def test_every_output_passes_dciodvfy_identified_deidentified_and_through_medtl_deid(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    src = _source(sample_dir)
    identified = write_study_results(predictor, src, tmp_path / "identified", check=False).files
    deid = Deidentifier(key=b"0123456789abcdef")
    deidentified = write_study_results(predictor, src, tmp_path / "deid", check=False, deidentifier=deid).files
    assert main(["deid", str(tmp_path / "identified"), str(tmp_path / "deid"), "--out", str(tmp_path / "again")]) == 0
    again = sorted((tmp_path / "again").rglob("*.dcm"))
    assert len(again) == 4
    kinds = {}
    for f in [*identified, *deidentified, *again]:
        ds = pydicom.dcmread(f)
        kinds.setdefault(ds.SOPClassUID.name, []).append(f)
        assert _dciodvfy_errors(f) == [], f
        if f in again or f in deidentified:
            assert ds.PatientIdentityRemoved == "YES" and ds.PatientID != pydicom.dcmread(src).PatientID
    assert sorted(kinds) == ["Comprehensive SR Storage", "Secondary Capture Image Storage"]
    # the de-identified SR still resolves its references (UIDs remapped consistently)
    sr = next(pydicom.dcmread(f) for f in again if pydicom.dcmread(f).Modality == "SR")
    sc = next(pydicom.dcmread(f) for f in again if pydicom.dcmread(f).Modality != "SR")
    [group] = _groups(sr)
    assert group["Best illustration of finding"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert "Answer:" in _comments(sr)[0] or _comments(sr)[0] == "ANONYMIZED"


def test_a_source_without_its_geometry_still_gets_an_image_library(tiny_run, sample_dir, tmp_path):
    ds = pydicom.dcmread(_source(sample_dir))
    del ds.PixelSpacing  # a CT without it: highdicom cannot describe the image's geometry
    ds.save_as(tmp_path / "src.dcm")
    files = write_study_results(load_run(tiny_run, device="cpu"), tmp_path / "src.dcm", tmp_path / "out", check=False)
    sr = pydicom.dcmread(files.files[0])
    [library_group] = _items(sr)["Image Library"].ContentSequence
    [entry] = [i for i in library_group.ContentSequence if i.ValueType == "IMAGE"]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert _code(_items(entry)["Modality"]) == ("DCM", "CT")  # (from the SOP class)
    assert _dciodvfy_errors(files.files[0]) == []


@pytest.mark.shared_data
def test_real_ct_results_pass_dciodvfy_deidentified_and_through_medtl_deid(tiny_run, shared_data, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    deid = Deidentifier(key=b"0123456789abcdef")
    for k, src in enumerate(
        [
            shared_data / "dicom" / "ct" / "CT_small.dcm",
            shared_data / "dicom" / "series" / "pydicom_dicomdirtests" / "98892001" / "CT2N",
        ]
    ):
        identified = write_study_results(predictor, src, tmp_path / f"{k}-identified", check=False).files
        deidentified = write_study_results(predictor, src, tmp_path / f"{k}-deid", check=False, deidentifier=deid).files
        assert main(["deid", str(tmp_path / f"{k}-identified"), "--out", str(tmp_path / f"{k}-again")]) == 0
        again = sorted((tmp_path / f"{k}-again").rglob("*.dcm"))
        assert len(again) == len(identified) == 2
        for f in [*deidentified, *again]:
            assert _dciodvfy_errors(f) == [], f
