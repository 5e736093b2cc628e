"""Results as FHIR R4: a DiagnosticReport and an Observation per finding, for an EHR or a FHIR server.

``create_fhir_bundle(record, sr)`` states a :class:`medtl.clinical.findings.ResultRecord` as a FHIR
``transaction`` Bundle (JSON), written as ``fhir.json`` beside the SR and optionally POSTed to a FHIR server's
base URL (:func:`post_fhir_bundle`):

- each **Observation** is one finding: its code (SNOMED CT where known, the run's own codes, medtl's private
  scheme as a fallback), the finding's own probability as ``valueQuantity`` in % (UCUM), ``interpretation``
  POS or NEG by the decision threshold, the threshold as ``referenceRange.high`` (on the same % scale),
  ``method`` the decision rule and ``device`` the model (by its DICOM device observer UID), derived from the
  imaging study (by its StudyInstanceUID); a refused input's findings have no value
  (``dataAbsentReason`` not-performed);
- the **DiagnosticReport**: status final, the result in words as ``conclusion``, the present findings'
  codes as ``conclusionCode``, ``result`` the Observations, ``imagingStudy`` the study by its
  StudyInstanceUID, identified by the SR's SOP Instance UID.

No name reaches FHIR. The subject (the patient) is left out unless the caller names the identifier system
of its patient IDs (``FhirOptions.subject_system``): it is then a reference by identifier, the DICOM
PatientID (de-identified results: the pseudonym). Entries are created with ``ifNoneExist`` on their
identifiers, so a result POSTed twice is stored once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pydicom

from medtl.clinical.findings import SCHEME, ResultRecord
from medtl.clinical.pacs import PacsError
from medtl.clinical.sr import device_uid
from medtl.errors import MedtlError

log = logging.getLogger("medtl.clinical.fhir")

TOKEN_ENV = "MEDTL_FHIR_TOKEN"  # a bearer token for the FHIR server (never on the command line)
SYSTEMS = {  # DICOM coding scheme designators as FHIR code systems
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "RADLEX": "http://radlex.org",
    SCHEME: "urn:medtl:finding",  # medtl's private scheme (a run's own classes)
}
DICOM_UID = "urn:dicom:uid"  # the identifier system of DICOM UIDs (values urn:oid:...)
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING_STUDY = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
NOT_PERFORMED = {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-performed"}


class FhirError(PacsError):
    """A FHIR server did not take the results: unreachable, slow or answering HTTP 5xx or 429 (``transient``: a
    rerun tries again), or answering another error."""


@dataclass(frozen=True)
class FhirOptions:
    """FHIR results: what they say beyond the findings, and where they go besides ``fhir.json``."""

    url: str | None = None  # a FHIR server's base URL: the transaction Bundle is POSTed there (None: only written)
    subject_system: str | None = None  # the identifier system of the hospital's patient IDs: the subject is then
    #   a reference by identifier (the DICOM PatientID); None: no subject (the study identifies the report)
    timeout: float = 30  # seconds to wait for the FHIR server


def _coding(code) -> dict:
    """A FHIR Coding of a DICOM code (pydicom's or highdicom's)."""
    system = SYSTEMS.get(code.scheme_designator, f"urn:dicom:scheme:{code.scheme_designator}")
    return {"system": system, "code": str(code.value), "display": str(code.meaning)}


def _uid_identifier(uid: str) -> dict:
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def _urn(seed: str) -> str:
    return "urn:uuid:" + str(uuid.UUID(bytes=hashlib.sha256(seed.encode()).digest()[:16], version=4))


def _percent(p: float) -> dict:
    return {"value": round(100.0 * float(p), 4), "unit": "%", "system": SYSTEMS["UCUM"], "code": "%"}


def create_fhir_bundle(record: ResultRecord, sr: pydicom.Dataset, options: FhirOptions | None = None) -> dict:
    """A FHIR R4 transaction Bundle: the DiagnosticReport and an Observation per finding of ``record``, for the
    study of ``sr`` (the SR written for it: its StudyInstanceUID, SOP Instance UID and PatientID)."""
    options = options or FhirOptions()
    issued = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    study = {"type": "ImagingStudy", "identifier": _uid_identifier(str(sr.StudyInstanceUID))}
    subject = None
    if options.subject_system and str(sr.get("PatientID", "")).strip():
        subject = {"type": "Patient", "identifier": {"system": options.subject_system, "value": str(sr.PatientID)}}
    device = {"identifier": _uid_identifier(device_uid(record.weights_sha256)), "display": record.model[:200]}
    entries = []
    for f in record.findings:
        identifier = _uid_identifier(_finding_uid(str(sr.SOPInstanceUID), f.name))
        obs: dict = {
            "resourceType": "Observation",
            "identifier": [identifier],
            "status": "cancelled" if record.refused else "final",
            "category": [{"coding": [IMAGING]}],
            "code": {"coding": [_coding(f.code)], "text": f.name},
            "issued": issued,
            "method": {"text": f"{record.model} ({record.version}): {record.decision}"[:1000]},
            "device": device,
            "derivedFrom": [study],
        }
        if subject:
            obs["subject"] = subject
        if f.probability is None:
            obs["dataAbsentReason"] = {"coding": [NOT_PERFORMED], "text": record.refused}
        else:
            obs["valueQuantity"] = _percent(f.probability)
            code, display = ("POS", "Positive") if f.present else ("NEG", "Negative")
            obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}]
        if f.threshold is not None:
            obs["referenceRange"] = [
                {"high": _percent(f.threshold), "text": "the decision threshold: positive at or above it"}
            ]
        entries.append(_entry(obs, identifier, f"{sr.SOPInstanceUID} {f.name}"))
    report: dict = {
        "resourceType": "DiagnosticReport",
        "identifier": [_uid_identifier(str(sr.SOPInstanceUID))],
        "status": "final",
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [IMAGING_STUDY]},
        "issued": issued,
        "result": [{"reference": e["fullUrl"], "type": "Observation"} for e in entries],
        "imagingStudy": [study],
        "conclusion": record.summary()[:4000],
    }
    if subject:
        report["subject"] = subject
    present = [{"coding": [_coding(f.code)], "text": f.name} for f in record.findings if f.present]
    if present:
        report["conclusionCode"] = present
    entries.append(_entry(report, report["identifier"][0], str(sr.SOPInstanceUID)))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _finding_uid(sr_uid: str, name: str) -> str:
    """A UID for a finding's Observation: derived from the SR's and the finding's name (the same on a rerun)."""
    digest = hashlib.sha256(f"medtl-observation\0{sr_uid}\0{name}".encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def _entry(resource: dict, identifier: dict, seed: str) -> dict:
    kind = resource["resourceType"]
    return {
        "fullUrl": _urn(f"{kind} {seed}"),
        "resource": resource,
        "request": {
            "method": "POST",
            "url": kind,
            "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}",
        },
    }


def write_fhir(bundle: dict, path: str | Path) -> Path:
    """Write ``bundle`` as JSON to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(bundle, indent=1) + "\n")
    return path


def validate_fhir_bundle(bundle: dict) -> None:
    """Check ``bundle`` and its resources against the FHIR R4 data model (``fhir.resources``, its R4B module:
    R4's technical correction, the same DiagnosticReport and Observation); a ``MedtlError`` says what is wrong."""
    from medtl.extras import require

    require("pacs", "fhir.resources.R4B.bundle", "FHIR validation")  # (an optional, heavy dependency)
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    kinds = {"Observation": Observation, "DiagnosticReport": DiagnosticReport}
    try:
        Bundle.model_validate(bundle)
        for e in bundle["entry"]:
            kinds[e["resource"]["resourceType"]].model_validate(e["resource"])  # type: ignore[attr-defined]
    except (ValueError, KeyError) as err:
        raise MedtlError(f"a FHIR resource is not valid R4: {str(err)[:600]}") from err


def post_fhir_bundle(bundle: dict, url: str, timeout: float = 30) -> int:
    """POST the transaction ``bundle`` to the FHIR server at ``url`` (its base URL); return the HTTP status.
    A bearer token is taken from ``$MEDTL_FHIR_TOKEN`` where set. Failures raise :class:`FhirError` naming the
    server, never the resources (they hold the study's identifiers)."""
    import requests  # (the pacs extra's HTTP client)

    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    where = urlsplit(url)
    server = f"{where.scheme}://{where.netloc}{where.path}"  # (no query: it may hold a key)
    try:
        answer = requests.post(url, data=json.dumps(bundle), headers=headers, timeout=timeout)
    except requests.RequestException as e:
        raise FhirError(f"FHIR server {server} unreachable ({type(e).__name__})", transient=True) from None
    if answer.status_code >= 300:
        transient = answer.status_code >= 500 or answer.status_code == 429
        raise FhirError(f"FHIR server {server} answered HTTP {answer.status_code} to the results", transient)
    log.info("FHIR results posted to %s (HTTP %d)", server, answer.status_code)
    return answer.status_code


__all__ = [
    "FhirOptions",
    "FhirError",
    "create_fhir_bundle",
    "write_fhir",
    "validate_fhir_bundle",
    "post_fhir_bundle",
    "TOKEN_ENV",
]
