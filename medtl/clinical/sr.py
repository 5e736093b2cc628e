"""The Structured Report's content: a TID 1500 Measurement Report (highdicom's ``highdicom.sr`` templates),
structured as the IHE AI Results (AIR) profile has an AI result:

- observation context: a device observer (TID 1004): name ``medtl``, manufacturer ``medtl``, model name the
  encoder, serial number the first 16 hex digits of the weights' sha256, its UID derived from them;
- procedure reported: Imaging procedure (SCT 363679005); an Image Library (TID 1600) of the source images;
- one measurement group (TID 1501) per finding: tracking identifier and UID, finding type (the finding's code),
  algorithm identification (TID 4019: name, version, parameters), Certainty of Finding (DCM 111012, the
  probability of *this* finding in %), the decision threshold (Threshold Value, DCM 122411, in %, the same
  scale), the qualitative evaluation (the finding: Present / Absent, SCT 52101004 / 272519000; Not Evaluated,
  SCT 373121007, for a refused input), the source images (Source of Measurement Group) and the saliency overlay's
  Secondary Capture (Best illustration of finding, DCM 121080);
- Qualitative Evaluations (DCM 126010): comments, the result in words and the model's quality.
"""

from __future__ import annotations

import hashlib

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr import RelationshipTypeValues as Rel
from pydicom.sr.coding import Code

from medtl.clinical.findings import NOT_EVALUATED, Finding, ResultRecord

TITLE = Code("126000", "DCM", "Imaging Measurement Report")
PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
DEVICE = CodedConcept("121007", "DCM", "Device")
CERTAINTY = Code("111012", "DCM", "Certainty of Finding")  # CID 6048 (CAD Certainty): the finding's probability, %
THRESHOLD = Code("122411", "DCM", "Threshold Value")
PRESENT, ABSENT = Code("52101004", "SCT", "Present"), Code("272519000", "SCT", "Absent")  # CID 240
ILLUSTRATION = Code("121080", "DCM", "Best illustration of finding")
QUALITATIVE = Code("126010", "DCM", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
PERCENT = Code("%", "UCUM", "percent")


def device_uid(weights_sha256: str) -> str:
    """The device observer's UID: the same model (weights) is the same device in every report."""
    return "2.25." + str(
        int.from_bytes(hashlib.sha256(f"medtl-device\0{weights_sha256}".encode()).digest()[:16], "big")
    )


def create_measurement_report(
    record: ResultRecord,
    sources: list[pydicom.Dataset],
    overlay: pydicom.Dataset | None,
    tracking_uids: dict[str, str],
    quality: str,
    library: list[pydicom.Dataset] | None = None,
) -> MeasurementReport:
    """The SR's content tree (TID 1500) for ``record`` on ``sources``; ``overlay``: the Secondary Capture that
    illustrates it (None for none); ``tracking_uids``: a UID per finding name; ``library``: the images of the
    Image Library (default: the sources; highdicom describes each by its modality's geometry)."""
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(record.weights_sha256),
        name="medtl",
        manufacturer_name="medtl",
        model_name=record.model[:64],
        serial_number=record.weights_sha256[:16],
    )
    context = ObservationContext(observer_device_context=ObserverContext(DEVICE, device))
    algorithm = AlgorithmIdentification(
        name=record.model[:64], version=record.version[:64], parameters=[record.decision[:1024]]
    )
    groups = [_group(f, record, algorithm, sources, overlay, tracking_uids[f.name]) for f in record.findings]
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        title=TITLE,
        referenced_images=sources if library is None else library,
    )
    words = ContainerContentItem(name=QUALITATIVE, relationship_type=Rel.CONTAINS)
    words.ContentSequence = ContentSequence(
        [
            TextContentItem(name=COMMENT, value=record.summary()[:1024], relationship_type=Rel.CONTAINS),
            TextContentItem(name=COMMENT, value=f"Model quality: {quality}"[:1024], relationship_type=Rel.CONTAINS),
        ]
    )
    report[0].ContentSequence.append(words)
    return report


def _group(
    finding: Finding,
    record: ResultRecord,
    algorithm: AlgorithmIdentification,
    sources: list[pydicom.Dataset],
    overlay: pydicom.Dataset | None,
    uid: str,
) -> MeasurementsAndQualitativeEvaluations:
    """A finding's measurement group (TID 1501)."""
    code = CodedConcept(finding.code.value, finding.code.scheme_designator, finding.code.meaning)
    measurements = []
    if finding.probability is not None:
        measurements.append(
            Measurement(name=CERTAINTY, value=_percent(finding.probability), unit=PERCENT, algorithm_id=algorithm)
        )
    value = NOT_EVALUATED if record.refused else PRESENT if finding.present else ABSENT
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid, identifier=f"medtl {finding.name}"[:64]),
        finding_type=code,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(name=code, value=value)],
        source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )
    items = group[0].ContentSequence
    if finding.threshold is not None:
        items.append(
            NumContentItem(
                name=THRESHOLD, value=_percent(finding.threshold), unit=PERCENT, relationship_type=Rel.CONTAINS
            )
        )
    if overlay is not None:
        items.append(
            ImageContentItem(
                name=ILLUSTRATION,
                referenced_sop_class_uid=overlay.SOPClassUID,
                referenced_sop_instance_uid=overlay.SOPInstanceUID,
                relationship_type=Rel.CONTAINS,
            )
        )
    return group


def _percent(p: float) -> float:
    return round(100.0 * float(p), 4)


__all__ = ["create_measurement_report", "device_uid", "CERTAINTY", "THRESHOLD", "PRESENT", "ABSENT", "ILLUSTRATION"]
