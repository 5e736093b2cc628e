"""What a result states, once, for every format that states it (the DICOM SR, the FHIR Observation): each
finding with its code, its probability, its threshold on the same scale and whether it is present.

The findings of a model: a binary model's finding is its positive class (``Decision.positive``, set by
``data.positive_class``), never the class it answered; a multi-label model's are its findings; a model of more
classes states each class. A finding's probability is always that finding's own (P(lesion), also when the
answer is "no lesion"), with the threshold it was compared to.

Codes: a finding is coded by ``RUN/finding_codes.yaml`` where the run has one (``class name: SCHEME:CODE:Meaning``,
e.g. ``lesion: SCT:52988006:Lesion``), else by SNOMED CT for the common names below, else in medtl's private
scheme ``99MEDTL`` (the class's index and name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.sr.coding import Code

from medtl.config import read_yaml_mapping
from medtl.errors import ConfigError
from medtl.predict.predictor import Predictor

SCHEME = "99MEDTL"  # a private coding scheme for a run's own classes (where no standard code is given or known)
CODES_FILE = "finding_codes.yaml"  # in a run folder: the codes of its classes, for DICOM and FHIR results
# standard codes of common findings (SNOMED CT), by lower-case class name: a run's own file takes precedence
KNOWN_FINDINGS = {
    "lesion": Code("52988006", "SCT", "Lesion"),
    "nodule": Code("27925004", "SCT", "Nodule"),
    "mass": Code("4147007", "SCT", "Mass"),
    "malignant": Code("363346000", "SCT", "Malignant neoplastic disease"),
    "malignancy": Code("363346000", "SCT", "Malignant neoplastic disease"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
    "pleural effusion": Code("60046008", "SCT", "Pleural effusion"),
    "effusion": Code("60046008", "SCT", "Pleural effusion"),
    "cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "fracture": Code("125605004", "SCT", "Fracture of bone"),
    "intracranial hemorrhage": Code("1386000", "SCT", "Intracranial hemorrhage"),
}
NOT_EVALUATED = Code("373121007", "SCT", "Not Evaluated")  # a refused input's findings


@dataclass(frozen=True)
class Finding:
    """One finding of a result: ``probability`` and ``threshold`` are both of this finding, in [0, 1]."""

    name: str  # the class (or multi-label finding) name
    code: Code
    probability: float | None  # None: not evaluated (the input was refused)
    threshold: float | None  # the operating point it was compared to; None: the most probable class was chosen
    present: bool


@dataclass(frozen=True)
class ResultRecord:
    """A prediction as results state it: the findings, the answer in words, a refusal's reason, the model."""

    findings: tuple[Finding, ...]
    answer: str  # the class answered (multi-label: the findings present, "|"-joined); "not assessed" if refused
    refused: str | None  # why the input was not assessed
    model: str  # "medtl ENCODER"
    version: str  # medtl's version and the weights' sha256 (16 hex digits)
    weights_sha256: str
    decision: str  # how the answer was decided, in words

    @property
    def probability(self) -> float | None:
        """The probability a one-line summary gives: a binary model's finding's, the answered class's, or a
        multi-label model's highest."""
        known = [f for f in self.findings if f.probability is not None]
        if not known:
            return None
        present = [f for f in known if f.present and f.threshold is None]  # (a model of more classes)
        return present[0].probability if present else max(f.probability for f in known)  # type: ignore[type-var]

    def summary(self) -> str:
        """The result in a sentence or two (an SR comment, a FHIR conclusion)."""
        if self.refused:
            return f"Not assessed: {self.refused}"
        parts = []
        for f in self.findings:
            said = "present" if f.present else "absent"
            p = f"probability {f.probability:.1%}"
            if f.threshold is not None:
                side = "at or above" if f.present else "below"
                parts.append(f"{f.name}: {said} ({p}, {side} the decision threshold {f.threshold:.1%})")
            else:
                parts.append(f"{f.name}: {'the most probable class' if f.present else 'not chosen'} ({p})")
        return f"Answer: {self.answer}. " + "; ".join(parts) + "."


def load_finding_codes(run_dir: str | Path) -> dict[str, Code]:
    """The codes ``RUN/finding_codes.yaml`` gives its classes (empty where the run has no such file)."""
    path = Path(run_dir) / CODES_FILE
    if not path.is_file():
        return {}
    codes = {}
    for name, value in read_yaml_mapping(path).items():
        parts = str(value).split(":", 2) if isinstance(value, str) else []
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise ConfigError(path, f"the code of {str(name)[:64]!r} is {str(value)[:80]!r}", "SCHEME:CODE:Meaning")
        scheme, code, meaning = (p.strip() for p in parts)
        if len(code) > 64 or len(meaning) > 64 or len(scheme) > 16:
            raise ConfigError(
                path, f"the code of {str(name)[:64]!r} is too long", "a code and meaning of 64 characters"
            )
        codes[str(name)] = Code(code, scheme, meaning)
    return codes


def finding_code(name: str, index: int, own: dict[str, Code]) -> Code:
    """A class's code: the run's own, else a standard code known for its name, else the private scheme's."""
    if name in own:
        return own[name]
    return KNOWN_FINDINGS.get(name.strip().lower()) or Code(str(index), SCHEME, name[:64])


def create_result_record(predictor: Predictor, pred, weights_sha256: str, version: str) -> ResultRecord:
    """What ``pred`` (a :class:`medtl.predict.predictor.Prediction` of ``predictor``) states, finding by finding."""
    d, names = predictor.decision, list(predictor.class_names)
    own = load_finding_codes(predictor.run_dir)
    stated: list[tuple[int, str, float | None]]  # (class index, name, threshold)
    if predictor.multi_label:
        stated = [(k, names[k], t) for k, t in enumerate(d.finding_thresholds)]
    elif len(names) == 2:  # the finding is the positive class, whatever the answer
        stated = [(d.positive, d.finding, d.threshold)]
    else:
        stated = [(k, name, None) for k, name in enumerate(names)]
    findings = []
    for k, name, t in stated:
        if pred.refused:
            findings.append(Finding(name, finding_code(name, k, own), None, t, False))
            continue
        p = float(pred.probabilities[name])
        present = name in (pred.findings or []) if predictor.multi_label else pred.label == name
        findings.append(Finding(name, finding_code(name, k, own), p, t, present))
    return ResultRecord(
        findings=tuple(findings),
        answer="not assessed" if pred.refused else pred.label,
        refused=pred.refused or None,
        model=f"medtl {predictor.encoder}",
        version=version,
        weights_sha256=weights_sha256,
        decision=d.describe(),
    )


__all__ = [
    "Finding",
    "ResultRecord",
    "create_result_record",
    "finding_code",
    "load_finding_codes",
    "SCHEME",
    "CODES_FILE",
    "KNOWN_FINDINGS",
    "NOT_EVALUATED",
]
