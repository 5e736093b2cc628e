"""Results back as DICOM (highdicom): a Comprehensive SR with the findings, and a Secondary Capture with
the saliency overlay, both in the source's study.

``write_dicom_results(predictor, path, out)`` reads a DICOM file or series folder, predicts and
explains it, and writes ``sr.dcm``, a TID 1500 Measurement Report (:mod:`medtl.clinical.sr`: the model as a
device observer, each finding coded (:mod:`medtl.clinical.findings`) with its own probability and the
threshold it was compared to, in %, present or absent, the source images and the Secondary Capture
referenced), and for an answered input ``sc.dcm``, a Secondary Capture of the overlay that references the
image it was drawn on. Both carry the source's patient and study modules, so they can be stored to
the PACS next to the images; each is in a new series, with new UIDs. A refused input gets an SR that
says its findings were not evaluated, and why. :func:`write_study_results` also writes the FHIR
DiagnosticReport and Observations (:mod:`medtl.clinical.fhir`) where asked.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from medtl.clinical.deid import Deidentifier
from medtl.clinical.fhir import FhirOptions, create_fhir_bundle, post_fhir_bundle, write_fhir
from medtl.clinical.findings import SCHEME, ResultRecord, create_result_record
from medtl.clinical.sr import create_measurement_report
from medtl.errors import MedtlInputError
from medtl.eval.quality import model_quality
from medtl.io.reader import sniff_format
from medtl.io.walk import walk_files
from medtl.models.encoders import file_sha256
from medtl.predict.predictor import Predictor
from medtl.run import RunDir
from medtl.version import __version__

# highdicom logs the UIDs of the datasets it copies from at INFO: kept out of medtl's output (they can be traced)
logging.getLogger("highdicom").setLevel(logging.WARNING)
log = logging.getLogger("medtl.clinical.dicom_results")

SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
# patient and study attributes the results inherit, required (Type 2: present, possibly empty) in them
TYPE2_INHERITED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def source_instances(path: Path, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """The headers of the DICOM instances a prediction was made from: the file, or the files of the chosen
    series of a folder, in instance order."""
    files = [path] if path.is_file() else sorted(walk_files(path))
    out = []
    for f in files:
        try:
            if sniff_format(f) != "dicom":
                continue
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM, or damaged: not a source of this result
            continue
        if "SOPInstanceUID" in ds and (series_uid is None or str(ds.get("SeriesInstanceUID", "")) == series_uid):
            for keyword in TYPE2_INHERITED:  # (in memory only) empty where the source leaves them out
                if keyword not in ds:
                    setattr(ds, keyword, "")
            if str(ds.PatientSex).strip().upper() not in ("M", "F", "O", ""):  # a value the standard does not
                ds.PatientSex = ""  # define is unknown to the results (Type 2: empty), not a crash
            out.append(_minimal(ds))
    if not out:
        raise MedtlInputError(path, "no DICOM instance to reference", "a DICOM file or series folder")
    return sorted(out, key=lambda d: int(d.get("InstanceNumber", 0) or 0))


# what results take from their source: the patient and study they are filed with, the instance they
# reference, the geometry of the overlay; nothing else of the source's header reaches them (highdicom
# would copy whatever patient-study attributes it finds, damaged values included)
KEPT_FROM_SOURCE = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    *TYPE2_INHERITED,
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceNumber",
    "ImageOrientationPatient",
    "Laterality",
    "FrameOfReferenceUID",
    "Rows",  # (the geometry: what the SR's image library says of each source image)
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagePositionPatient",
    "SliceThickness",
    "PatientOrientation",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


def _minimal(ds: pydicom.Dataset) -> pydicom.Dataset:
    out = pydicom.Dataset()
    for keyword in KEPT_FROM_SOURCE:
        if keyword in ds:
            out.add(ds[keyword])
    return out


def _patient_orientation(ds: pydicom.Dataset) -> tuple[str, str]:
    """Patient orientation letters (row, column directions) from ImageOrientationPatient; ("L", "P") for
    an axial image when the file gives none."""
    iop = ds.get("ImageOrientationPatient")
    if not iop or len(iop) != 6:
        return "L", "P"

    def letter(v) -> str:
        axis = int(np.argmax(np.abs(v)))
        return ("L", "P", "H")[axis] if v[axis] > 0 else ("R", "A", "F")[axis]

    return letter(np.asarray(iop[:3], float)), letter(np.asarray(iop[3:], float))


def result_uid(sources: list[pydicom.Dataset], weights_sha256: str, what: str) -> str:
    """A UID for a result, derived from its source instances, the model's weights and which result it is
    (``what``, with its finding or method): the same input, model and answer give the same UIDs, so a
    result stored twice is recognised as the same instance (``medtl pacs`` stores nothing twice)."""
    seed = "\0".join(["medtl-result", what, weights_sha256, *sorted(str(ds.SOPInstanceUID) for ds in sources)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:16], "big"))  # PS3.5 B.2


DEID_MARKS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


UNSTATED_METHOD = "de-identified by the source's sender (method not stated)"


def _mark_deidentified(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """A result built on a de-identified source says so, as the source does (highdicom does not copy it). A
    source that says YES without a method (DeidentificationMethod, Type 1C) gets one that says so: the
    result would otherwise be invalid (dciodvfy: an error)."""
    for keyword in DEID_MARKS:
        if keyword in source:
            setattr(result, keyword, source[keyword].value)
    said = str(result.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
    if said and not result.get("DeidentificationMethod") and not result.get("DeidentificationMethodCodeSequence"):
        result.DeidentificationMethod = UNSTATED_METHOD


@contextlib.contextmanager
def _names_unquoted():
    """highdicom warns about a person name without a caret by quoting it ("The string "..." is unlikely to
    represent the intended person name"): such warnings are caught and logged without the name; any other
    warning is passed on as it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "unlikely to represent the intended person name" in str(w.message):
            log.debug("a person name of the source has a single component (kept as it is)")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@dataclass(frozen=True)
class StudyResults:
    """What :func:`write_study_results` wrote, and what it stated."""

    files: list[Path]  # sr.dcm, and sc.dcm for an answered input
    record: ResultRecord  # the findings, their probabilities and thresholds, the answer
    fhir: Path | None = None  # fhir.json (a FHIR R4 transaction Bundle) where asked for


def write_dicom_results(
    predictor: Predictor,
    path: str | Path,
    out: str | Path,
    method: str | None = None,
    check: bool = True,
    deidentifier: Deidentifier | None = None,
) -> list[Path]:
    """Predict and explain the DICOM file or series folder ``path``; write ``sr.dcm`` (and ``sc.dcm`` for an
    answered input) into ``out``; return the files written (:func:`write_study_results`, its DICOM files)."""
    return write_study_results(predictor, path, out, method, check, deidentifier).files


def write_study_results(
    predictor: Predictor,
    path: str | Path,
    out: str | Path,
    method: str | None = None,
    check: bool = True,
    deidentifier: Deidentifier | None = None,
    fhir: FhirOptions | None = None,
) -> StudyResults:
    """Predict and explain the DICOM file or series folder ``path``; write ``sr.dcm`` and, for an answered input,
    ``sc.dcm`` into ``out``; with ``fhir``, also ``fhir.json`` (:mod:`medtl.clinical.fhir`), POSTed to ``fhir.url``
    where it is set (a failure there raises :class:`medtl.clinical.fhir.FhirError` after the files are written).

    With a ``deidentifier`` (:class:`medtl.clinical.deid.Deidentifier`), the results are built on the sources'
    de-identified headers: pseudonymised patient, shifted dates, remapped UIDs (the references between
    the results and the de-identified sources still resolve). Without one, they carry the source's
    patient and study, for storing back next to the images."""
    path, out = Path(path), Path(out)
    scan = predictor.read(path)  # read once: the explanation and the series choice both use it
    expl = predictor.explain(scan, method=method, check=check)
    pred = expl.prediction
    series_uid = (scan.header.get("series") or {}).get("series_uid") if isinstance(scan.header, dict) else None
    sources = source_instances(path, series_uid)
    if deidentifier is not None:
        sources = [deidentifier.dataset(ds, name=path) for ds in sources]
    out.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(predictor.run_dir / RunDir.MODEL)
    record = create_result_record(predictor, pred, sha, f"medtl {__version__}; weights sha256 {sha[:16]}")
    overlay = _create_overlay(expl, sources, sha, predictor.encoder) if expl.overlay is not None else None
    sr = _create_sr(predictor, record, sources, overlay, sha)
    written = [out / "sr.dcm"]
    sr.save_as(written[0])
    if overlay is not None:
        written.append(out / "sc.dcm")
        overlay.save_as(written[1])
    fhir_path = None
    if fhir is not None:  # the DiagnosticReport and Observations beside the SR; POSTed where asked
        bundle = create_fhir_bundle(record, sr, fhir)
        fhir_path = write_fhir(bundle, out / "fhir.json")
        if fhir.url:
            post_fhir_bundle(bundle, fhir.url, fhir.timeout)
    return StudyResults(written, record, fhir_path)


def _create_sr(
    predictor: Predictor,
    record: ResultRecord,
    sources: list[pydicom.Dataset],
    overlay: pydicom.Dataset | None,
    sha: str,
) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR (TID 1500, :mod:`medtl.clinical.sr`) of ``record``, in the sources' study."""
    uids = {f.name: result_uid(sources, sha, f"tracking {f.name}") for f in record.findings}
    quality = _quality_text(predictor)
    try:
        content = create_measurement_report(record, sources, overlay, uids, quality)
    except (AttributeError, IndexError, TypeError, ValueError) as e:  # a source without its modality's geometry
        log.debug("image library entries without geometry: %s", type(e).__name__)
        undescribed = [copy.copy(ds) for ds in sources]
        for ds in undescribed:  # (highdicom describes CT/MR/PT and projection images; "OT" only by the SOP class)
            ds.Modality = "OT"
        content = create_measurement_report(record, sources, overlay, uids, quality, library=undescribed)
    # the finding is part of the SR's identity: a study answered after being refused gets a new SR
    with _names_unquoted():
        sr = hd.sr.ComprehensiveSR(
            evidence=sources + ([overlay] if overlay is not None else []),
            content=content[0],
            series_instance_uid=result_uid(sources, sha, "sr series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=result_uid(sources, sha, f"sr tid1500 {record.answer}"),
            instance_number=1,
            manufacturer="medtl",
            is_complete=True,
        )
    _equipment(sr, record.model, sha)
    _mark_deidentified(sr, sources[0])
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the texts ("–", a class's name) and the source's names alike
    if any(f.code.scheme_designator == SCHEME for f in record.findings):  # a private scheme used is declared
        private = pydicom.Dataset()  # (SOP Common, PS3.3 C.12.1)
        private.CodingSchemeDesignator, private.CodingSchemeName = SCHEME, "medtl: a run's own classes"
        private.CodingSchemeResponsibleOrganization = "medtl"
        sr.CodingSchemeIdentificationSequence = [private]
    return sr


def _equipment(ds: pydicom.Dataset, model: str, sha: str) -> None:
    """General Equipment: the model, medtl's version and the weights (what made the result)."""
    ds.ManufacturerModelName = model[:64]
    ds.SoftwareVersions = [f"medtl {__version__}", f"weights {sha[:16]}"]


def _quality_text(predictor: Predictor) -> str:
    """How good the model is (:func:`medtl.eval.quality.model_quality`), said beside its answer."""
    d = predictor.decision
    finding = d.finding if not d.multi_label and len(d.class_names) == 2 else None
    quality = model_quality(predictor.run_dir, finding)
    return " ".join([*(f"[{b}]" for b in quality.badges()), quality.sentence()])


def _create_overlay(expl, sources: list[pydicom.Dataset], sha: str, encoder: str) -> hd.sc.SCImage:
    """The saliency overlay as a Secondary Capture on the source's patient and study (the slice judged, for a
    series), referencing the image it was drawn on (SourceImageSequence)."""
    pred = expl.prediction
    ref = sources[min(len(sources) - 1, max(0, pred.slice_index or 0))] if len(sources) > 1 else sources[0]
    with _names_unquoted():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=np.ascontiguousarray(expl.overlay, dtype=np.uint8),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=_patient_orientation(ref),
            series_instance_uid=result_uid(sources, sha, "sc series"),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=result_uid(sources, sha, f"sc with source {expl.method}"),
            instance_number=1,
            manufacturer="medtl",
            series_description=f"medtl {expl.method} overlay"[:64],
        )
    # General Series' Laterality (Type 2C): as the source has it; empty (unknown to medtl) when it has none
    # (dciodvfy then warns that absent would do for an unpaired part, but reports absence as an error)
    sc.Laterality = ref.get("Laterality", "")
    source = pydicom.Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
    purpose = pydicom.Dataset()  # CID 7202: the image the overlay was computed from and drawn on
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    source.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [source]
    sc.DerivationDescription = f"{expl.method} saliency of {pred.label} over the source image"[:1024]
    sc.BurnedInAnnotation = "NO"  # (the overlay is colour, no text)
    _equipment(sc, f"medtl {encoder}", sha)
    _mark_deidentified(sc, ref)
    return sc


__all__ = ["write_dicom_results", "write_study_results", "StudyResults", "source_instances", "result_uid", "SCHEME"]
