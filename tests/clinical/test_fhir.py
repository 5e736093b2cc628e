"""FHIR results (issue 32, build item 5): a DiagnosticReport and an Observation per finding, R4 JSON beside the
SR, valid by ``fhir.resources`` (its R4B models: R4's technical correction); the finding's probability in %,
positive or negative by the threshold; the study by its UID; no patient unless asked; POSTed to a FHIR server
(here a local one a test starts, which checks what it receives) by ``dicom-results --fhir-url`` and by
``pacs run``'s ``answer_study``."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.deid import Deidentifier
from medtl.clinical.dicom_results import write_study_results
from medtl.clinical.fhir import TOKEN_ENV, FhirError, FhirOptions, post_fhir_bundle, validate_fhir_bundle
from medtl.clinical.pacs_run import answer_study
from medtl.errors import MedtlError
from medtl.predict.predictor import load_run

pytest.importorskip("fhir.resources.R4B", reason="fhir.resources (the pacs extra) validates the FHIR results")


class FhirServer:
    """A FHIR server's transaction endpoint on loopback: it keeps each Bundle POSTed to it (validated, with its
    headers) and answers ``status``."""

    def __init__(self, status: int = 200):
        self.received: list[tuple[dict, dict]] = []
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.received.append((body, dict(self.headers)))
                answer = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": []}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):  # (quiet)
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _source(sample_dir):
    return sorted((sample_dir / "dicom").glob("*.dcm"))[2]


def test_fhir_results_state_the_finding_and_validate(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    src = _source(sample_dir)
    pred = predictor.predict(src, check=False)
    results = write_study_results(predictor, src, tmp_path, check=False, fhir=FhirOptions())
    assert results.fhir == tmp_path / "fhir.json"
    bundle = json.loads(results.fhir.read_text())
    validate_fhir_bundle(bundle)
    assert bundle["type"] == "transaction"
    [obs], [report] = _resources(bundle, "Observation"), _resources(bundle, "DiagnosticReport")
    assert obs["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "52988006", "display": "Lesion"}
    assert obs["valueQuantity"]["value"] == pytest.approx(100 * pred.probabilities["lesion"], abs=1e-3)
    assert obs["valueQuantity"]["code"] == "%" and obs["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert obs["referenceRange"][0]["high"]["value"] == pytest.approx(100 * predictor.decision.threshold, abs=1e-3)
    positive = pred.probabilities["lesion"] >= predictor.decision.threshold
    assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if positive else "NEG")
    assert obs["device"]["display"] == f"medtl {predictor.encoder}" and "weights sha256" in obs["method"]["text"]
    sr = pydicom.dcmread(results.files[0])
    assert report["status"] == "final" and report["identifier"][0]["value"] == f"urn:oid:{sr.SOPInstanceUID}"
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{sr.StudyInstanceUID}"
    assert obs["derivedFrom"] == report["imagingStudy"]
    assert report["result"][0]["reference"] == bundle["entry"][0]["fullUrl"]
    assert f"Answer: {pred.label}." in report["conclusion"]
    assert ("conclusionCode" in report) == positive
    # no patient: no subject, and nothing of the patient module anywhere
    text = results.fhir.read_text()
    source = pydicom.dcmread(src)
    assert "subject" not in report and "subject" not in obs
    for value in (source.PatientID, str(source.PatientName), "SYNTHETIC"):
        assert value not in text
    # entries are created once: a rerun's bundle is the same but for the time it was issued
    again = write_study_results(predictor, src, tmp_path / "again", check=False, fhir=FhirOptions())
    assert [e["request"] for e in json.loads(again.fhir.read_text())["entry"]] == [
        e["request"] for e in bundle["entry"]
    ]


def test_the_subject_is_a_reference_by_identifier_only_when_asked(tiny_run, sample_dir, tmp_path):
    deid = Deidentifier(key=b"0123456789abcdef")
    source = pydicom.dcmread(_source(sample_dir))
    options = FhirOptions(subject_system="urn:oid:1.2.3.4.5")
    results = write_study_results(
        load_run(tiny_run, device="cpu"), _source(sample_dir), tmp_path, check=False, deidentifier=deid, fhir=options
    )
    bundle = json.loads(results.fhir.read_text())
    validate_fhir_bundle(bundle)
    [report] = _resources(bundle, "DiagnosticReport")
    expected = {
        "type": "Patient",
        "identifier": {"system": "urn:oid:1.2.3.4.5", "value": deid.pseudonym(source.PatientID)},
    }
    assert report["subject"] == expected and _resources(bundle, "Observation")[0]["subject"] == expected
    assert source.PatientID not in results.fhir.read_text()  # de-identified results: the pseudonym only


def test_a_refused_input_gets_observations_without_a_value(tiny_run, sample_dir, tmp_path, monkeypatch):
    predictor = load_run(tiny_run, device="cpu")
    monkeypatch.setattr(predictor.ood, "threshold", -1.0)  # everything lies outside: a refusal
    results = write_study_results(predictor, _source(sample_dir), tmp_path, fhir=FhirOptions())
    bundle = json.loads(results.fhir.read_text())
    validate_fhir_bundle(bundle)
    [obs], [report] = _resources(bundle, "Observation"), _resources(bundle, "DiagnosticReport")
    assert obs["status"] == "cancelled" and obs["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    assert "valueQuantity" not in obs and "interpretation" not in obs
    assert report["conclusion"].startswith("Not assessed:") and "conclusionCode" not in report


def test_the_validator_refuses_what_r4_does_not_allow(tiny_run, sample_dir, tmp_path):
    results = write_study_results(
        load_run(tiny_run, device="cpu"), _source(sample_dir), tmp_path, check=False, fhir=FhirOptions()
    )
    bundle = json.loads(results.fhir.read_text())
    bundle["entry"][0]["resource"]["valueQuantity"]["value"] = "high"
    with pytest.raises(MedtlError, match="not valid R4"):
        validate_fhir_bundle(bundle)
    bundle = json.loads(results.fhir.read_text())
    del bundle["entry"][-1]["resource"]["code"]  # DiagnosticReport.code is required
    with pytest.raises(MedtlError, match="not valid R4"):
        validate_fhir_bundle(bundle)


def test_dicom_results_posts_the_bundle_to_a_fhir_server(tiny_run, sample_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "secret-token")
    src = _source(sample_dir)
    with FhirServer() as server:
        args = ["dicom-results", str(tiny_run), str(src), "--out", str(tmp_path / "out"), "--device", "cpu"]
        assert main([*args, "--fhir-url", server.url]) in (0, 3)
    [(bundle, headers)] = server.received
    validate_fhir_bundle(bundle)
    assert headers["Content-Type"] == "application/fhir+json" and headers["Authorization"] == "Bearer secret-token"
    [written] = (tmp_path / "out").glob("*/fhir.json")
    assert json.loads(written.read_text()) == bundle  # what was sent is what was written beside the SR
    assert (written.parent / "sr.dcm").is_file()
    out = capsys.readouterr()
    assert "fhir.json" in out.out and pydicom.dcmread(src).StudyInstanceUID not in out.out + out.err


def test_pacs_answer_study_posts_and_a_failing_server_is_a_clean_outcome(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    images = tmp_path / "images"
    images.mkdir()
    source = pydicom.dcmread(_source(sample_dir))
    source.save_as(images / "1.dcm")
    with FhirServer() as server:
        outcome = answer_study(
            predictor, images, tmp_path / "r1", "study-key", check=False, fhir=FhirOptions(server.url)
        )
    assert outcome.status == "answered" and len(server.received) == 1
    [report] = _resources(server.received[0][0], "DiagnosticReport")
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{source.StudyInstanceUID}"
    for status, final in ((503, "retry"), (400, "error")):
        with FhirServer(status) as server:
            outcome = answer_study(
                predictor, images, tmp_path / f"r{status}", "study-key", check=False, fhir=FhirOptions(server.url)
            )
        assert outcome.status == final and f"HTTP {status}" in outcome.reason
        assert source.StudyInstanceUID not in outcome.reason and source.PatientID not in outcome.reason


def test_an_unreachable_fhir_server_is_a_temporary_failure():
    with FhirServer() as server:
        url = server.url
    with pytest.raises(FhirError, match="unreachable") as caught:
        post_fhir_bundle({"resourceType": "Bundle", "type": "transaction"}, url, timeout=5)
    assert caught.value.transient
