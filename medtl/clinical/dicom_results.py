"""Results back as DICOM (highdicom): a Comprehensive SR with the finding, and a Secondary Capture with
the saliency overlay, both in the source's study.

``write_dicom_results(predictor, path, out)`` reads a DICOM file or series folder, predicts and
explains it, and writes ``sr.dcm``, a Comprehensive Structured Report (the finding as a coded concept,
its calibrated probability, the operating point, the model's name, medtl's version and the weight
file's sha256, the source instances referenced), and for an answered input ``sc.dcm``, a Secondary
Capture of the overlay. Both carry the source's patient and study modules, so they can be stored to
the PACS next to the images; each is in a new series, with new UIDs. A refused input gets an SR that
says it was not assessed, and why. Classes are coded in the private scheme ``99MEDTL`` (their index
and name), since a run's classes are the user's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ImageContentItem,
    NumContentItem,
    TextContentItem,
)
from highdicom.sr import RelationshipTypeValues as Rel

from medtl.clinical.deid import Deidentifier
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

SCHEME = "99MEDTL"  # a private coding scheme for a run's own classes and medtl's quantities
NO_UNITS = CodedConcept("1", "UCUM", "no units")
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
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


def _minimal(ds: pydicom.Dataset) -> pydicom.Dataset:
    out = pydicom.Dataset()
    for keyword in KEPT_FROM_SOURCE:
        if keyword in ds:
            out.add(ds.data_element(keyword))
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


def _mark_deidentified(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """A result built on a de-identified source says so, as the source does (highdicom does not copy it)."""
    for keyword in DEID_MARKS:
        if keyword in source:
            setattr(result, keyword, source.data_element(keyword).value)


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


def write_dicom_results(
    predictor: Predictor,
    path: str | Path,
    out: str | Path,
    method: str | None = None,
    check: bool = True,
    deidentifier: Deidentifier | None = None,
) -> list[Path]:
    """Predict and explain the DICOM file or series folder ``path``; write ``sr.dcm`` (and ``sc.dcm`` for an
    answered input) into ``out``; return the files written.

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
    items = _algorithm_items(predictor, sha) + _finding_items(predictor, pred) + [_quality_item(predictor)]
    items += [
        ImageContentItem(
            name=CodedConcept("121112", "DCM", "Source of Measurement"),
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=Rel.CONTAINS,
        )
        for ds in sources
    ]
    # the finding is part of the SR's identity: a study answered after being refused gets a new SR
    finding = "not assessed" if pred.refused else pred.label
    root = ContainerContentItem(name=CodedConcept("126000", "DCM", "Imaging Measurement Report"))
    root.ContentSequence = items
    with _names_unquoted():
        sr = hd.sr.ComprehensiveSR(
            evidence=sources,
            content=root,
            series_instance_uid=result_uid(sources, sha, "sr series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=result_uid(sources, sha, f"sr {finding}"),
            instance_number=1,
            manufacturer="medtl",
            is_complete=True,
        )
    written = [out / "sr.dcm"]
    _mark_deidentified(sr, sources[0])
    sr.save_as(written[0])
    if expl.overlay is not None:
        written.append(_write_overlay(expl, sources, sha, out / "sc.dcm"))
    return written


def _algorithm_items(predictor: Predictor, sha: str) -> list:
    """The SR's observation context: the algorithm's name and version (with its weights' sha256)."""
    return [
        TextContentItem(
            name=CodedConcept("111001", "DCM", "Algorithm Name"),
            value=f"medtl {predictor.encoder}",
            relationship_type=Rel.HAS_OBS_CONTEXT,
        ),
        TextContentItem(
            name=CodedConcept("111003", "DCM", "Algorithm Version"),
            value=f"medtl {__version__}; weights sha256 {sha[:16]}",
            relationship_type=Rel.HAS_OBS_CONTEXT,
        ),
    ]


def _finding_items(predictor: Predictor, pred) -> list:
    """The SR's findings: "not assessed" with the reason for a refusal; one Finding per finding with its
    probability, threshold and decision for a multi-label model; else the decided class, its probability and
    the operating point's threshold (where the run has one)."""
    if pred.refused:
        return [
            CodeContentItem(
                name=CodedConcept("121071", "DCM", "Finding"),
                value=CodedConcept("not-assessed", SCHEME, "Not assessed"),
                relationship_type=Rel.CONTAINS,
            ),
            TextContentItem(
                name=CodedConcept("121106", "DCM", "Comment"), value=pred.refused[:1024], relationship_type=Rel.CONTAINS
            ),
        ]
    items = []
    if predictor.multi_label:
        for k, (name, t) in enumerate(zip(predictor.class_names, predictor.decision.finding_thresholds)):
            present = name in (pred.findings or [])
            items += [
                CodeContentItem(
                    name=CodedConcept("121071", "DCM", "Finding"),
                    value=CodedConcept(str(k), SCHEME, name[:64]),
                    relationship_type=Rel.CONTAINS,
                ),
                _number("probability", "Probability of finding", pred.probabilities[name]),
                _number("threshold", "Operating point threshold", t),
                TextContentItem(
                    name=CodedConcept("121106", "DCM", "Comment"),
                    value=f"{name}: {'present' if present else 'absent'} (probability "
                    f"{'at or above' if present else 'below'} its threshold)"[:1024],
                    relationship_type=Rel.CONTAINS,
                ),
            ]
        return items
    k = predictor.class_names.index(pred.label)
    d = predictor.decision
    # the probability the threshold applies to: the finding's (a binary model's positive class), not the answer's
    judged = d.finding if d.threshold is not None else pred.label
    items += [
        CodeContentItem(
            name=CodedConcept("121071", "DCM", "Finding"),
            value=CodedConcept(str(k), SCHEME, pred.label[:64]),
            relationship_type=Rel.CONTAINS,
        ),
        _number("probability", "Probability of finding", pred.probabilities[judged]),
    ]
    if d.threshold is not None:
        items.append(_number("threshold", "Operating point threshold", d.threshold))
        items.append(
            TextContentItem(
                name=CodedConcept("121106", "DCM", "Comment"),
                value=f"The probability and its threshold are of {judged}; the answer is {pred.label}."[:1024],
                relationship_type=Rel.CONTAINS,
            )
        )
    return items


def _quality_item(predictor: Predictor) -> TextContentItem:
    """How good the model is (:func:`medtl.eval.quality.model_quality`), said beside its answer."""
    d = predictor.decision
    finding = d.finding if not d.multi_label and len(d.class_names) == 2 else None
    quality = model_quality(predictor.run_dir, finding)
    text = " ".join([*(f"[{b}]" for b in quality.badges()), quality.sentence()])
    name = CodedConcept("model-quality", SCHEME, "Model quality")
    return TextContentItem(name=name, value=text[:1024], relationship_type=Rel.CONTAINS)


def _number(code: str, meaning: str, value: float) -> NumContentItem:
    """A unitless number of medtl's own coding scheme, rounded to 6 decimals."""
    return NumContentItem(
        name=CodedConcept(code, SCHEME, meaning),
        value=round(float(value), 6),
        unit=NO_UNITS,
        relationship_type=Rel.CONTAINS,
    )


def _write_overlay(expl, sources: list[pydicom.Dataset], sha: str, path: Path) -> Path:
    """The saliency overlay as a Secondary Capture on the source's patient and study (the slice judged, for a
    series), written to ``path``."""
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
            sop_instance_uid=result_uid(sources, sha, f"sc {expl.method}"),
            instance_number=1,
            manufacturer="medtl",
            series_description=f"medtl {expl.method} overlay"[:64],
        )
    # General Series' Laterality (Type 2C): as the source has it; empty (unknown to medtl) when it has none
    # (dciodvfy then warns that absent would do for an unpaired part, but reports absence as an error)
    sc.Laterality = ref.get("Laterality", "")
    _mark_deidentified(sc, ref)
    sc.save_as(path)
    return path


__all__ = ["write_dicom_results", "source_instances", "result_uid", "SCHEME"]
