"""Running a model on a PACS's studies: retrieve each (WADO-RS), predict, answer it with a Structured Report and a
Secondary Capture of the saliency overlay (:func:`medtl.clinical.dicom_results.write_dicom_results`) and store
them in the study (STOW-RS).

The results' UIDs derive from the source instances and the model's weights, and a result the PACS already
holds is not sent again: re-running stores nothing twice. A study that cannot be retrieved, read or stored
is reported with its key and the reason; the others go on. A temporary failure (the PACS unreachable, slow
or answering HTTP 5xx, after the client's retries) is recorded as ``retry``: a rerun with the same CSV tries
that study again, while one answered, refused or failed for good (HTTP 4xx, an unreadable study) is skipped.

The retrieved images are the patient's: they live in a private temporary folder, removed after each study,
and also when the run is stopped by SIGTERM (or Ctrl-C).
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from medtl.clinical.dicom_results import write_study_results
from medtl.clinical.fhir import FhirOptions
from medtl.clinical.pacs import Pacs, PacsError, study_key
from medtl.clinical.signals import handling_signals
from medtl.errors import MedtlError
from medtl.predict.batch import done_keys
from medtl.predict.predictor import Predictor

if TYPE_CHECKING:  # (pynetdicom is imported where a dimse:// PACS is used)
    from medtl.clinical.dimse import DimsePacs

log = logging.getLogger("medtl.clinical.pacs")
RETRY = "retry"  # the status of a study that failed for a temporary reason: not done, a rerun tries it again


@dataclass
class StudyOutcome:
    key: str
    status: str  # answered, refused, error (for good), retry (a temporary failure)
    label: str = ""
    probability: float | None = None
    stored: int = 0
    already: int = 0
    reason: str = ""


OUTCOME_FIELDS = ["study", "status", "label", "probability", "stored", "already_there", "reason"]


def run_studies(
    predictor: Predictor,
    pacs: Pacs | DimsePacs,
    study_uids: Iterable[str],
    cache: str | Path | None = None,
    store: bool = True,
    method: str | None = None,
    check: bool = True,
    csv_path: str | Path | None = None,
    fhir: FhirOptions | None = None,
) -> list[StudyOutcome]:
    """Retrieve each study, predict, write its SR and Secondary Capture and store them back (unless
    ``store`` is False). A study's files live in ``cache`` (a private temporary folder by default,
    removed afterwards, and on SIGTERM). One outcome per study; a failure is an outcome, not an exception.
    With ``csv_path``, a row per study is appended as it ends, and studies whose last row is final (not
    ``retry``) are skipped (an interrupted run resumes, a temporary failure is tried again). With ``fhir``, each
    study's FHIR DiagnosticReport and Observations go to ``fhir.url`` (:mod:`medtl.clinical.fhir`).
    ``check=False`` answers studies unlike the training images too."""
    study_uids = list(study_uids)
    done = finished_keys(Path(csv_path)) if csv_path else set()
    todo = [uid for uid in study_uids if study_key(uid) not in done]
    if len(todo) < len(study_uids):
        log.info("%d of %d studies already in %s", len(study_uids) - len(todo), len(study_uids), csv_path)
    outcomes = []
    own = tempfile.TemporaryDirectory(prefix="medtl-pacs-") if cache is None else None
    root = Path(own.name) if own is not None else Path(str(cache))
    writer = _OutcomeWriter(csv_path) if csv_path else None
    t_start = time.perf_counter()
    try:
        with handling_signals(_exit_on_sigterm):
            for k, uid in enumerate(todo, 1):
                outcome = _run_study(predictor, pacs, uid, root, store, method, check, fhir)
                outcomes.append(outcome)
                if writer:
                    writer.write(outcome)
                elapsed = time.perf_counter() - t_start
                eta = elapsed / k * (len(todo) - k)
                log.info("%d/%d studies, ETA %d:%02d", k, len(todo), eta // 60, eta % 60)
    finally:
        if writer:
            writer.close()
        if own is not None:
            own.cleanup()
    return outcomes


def finished_keys(csv_path: Path) -> set[str]:
    """The studies of ``csv_path`` (a ``--csv`` of earlier runs) whose last row is final: answered, refused,
    or an error that a retry would not mend; not those whose last row is ``retry``."""
    done_keys(csv_path, "study")  # (drops a last row cut off by an interruption)
    if not csv_path.is_file():
        return set()
    last: dict[str, str] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("study"):
                last[row["study"]] = row.get("status", "")
    return {key for key, status in last.items() if status != RETRY}


def _exit_on_sigterm(signum, frame):
    """SIGTERM (a service stopped, a job cancelled) raises SystemExit while the studies run, so that the
    ``finally`` blocks remove the retrieved images instead of the process dying with them on disk."""
    log.warning("stopped by signal %d: removing the retrieved studies", signum)
    raise SystemExit(128 + signum)


def _run_study(
    predictor: Predictor,
    pacs: Pacs | DimsePacs,
    uid: str,
    root: Path,
    store: bool,
    method: str | None,
    check: bool,
    fhir: FhirOptions | None = None,
) -> StudyOutcome:
    key = study_key(uid)
    folder = root / key
    try:
        try:
            pacs.retrieve(uid, folder / "images")
        except MedtlError as e:
            return failed_outcome(key, e, folder, uid)
        store_to = pacs if store else None
        images, results = folder / "images", folder / "results"
        return answer_study(predictor, images, results, key, store_to, method, check, uid, fhir)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the study's images and results: not kept


def answer_study(
    predictor: Predictor,
    images: Path,
    results: Path,
    key: str,
    pacs: Pacs | DimsePacs | None = None,
    method: str | None = None,
    check: bool = True,
    uid: str = "",
    fhir: FhirOptions | None = None,
) -> StudyOutcome:
    """Predict on the study whose instances are in ``images`` (retrieved by :func:`run_studies`, or received by
    the DIMSE listener, :mod:`medtl.clinical.dimse_listen`), write its SR and Secondary Capture into ``results``
    and, with ``pacs``, store them there. A failure is an outcome naming ``key`` (not the folders or ``uid``),
    not an exception. The caller removes the folders."""
    t0 = time.perf_counter()
    try:
        written = write_study_results(predictor, images, results, method, check, fhir=fhir)  # (FHIR: POSTed there)
        datasets = [pydicom.dcmread(f) for f in written.files]
        record, answered = written.record, len(datasets) > 1
        stored, already = pacs.store(datasets) if pacs is not None else (0, 0)
        if answered:  # the answer, and the probability of its finding (a binary model's positive class)
            outcome = StudyOutcome(key, "answered", record.answer, record.probability, stored, already)
        else:
            outcome = StudyOutcome(key, "refused", stored=stored, already=already, reason=record.refused or "")
        log.info(
            "%s: %d images, %s%s, %d results stored, %d already there (%.1f s)",
            key,
            sum(1 for _ in images.iterdir()),
            outcome.status,
            f" {outcome.label}" if answered else "",
            stored,
            already,
            time.perf_counter() - t0,
        )
        return outcome
    except MedtlError as e:
        return failed_outcome(key, e, images, results, uid)


def failed_outcome(key: str, error: MedtlError, *hidden: str | Path) -> StudyOutcome:
    """The outcome of a study that failed with ``error``, logged; the ``hidden`` folders and UID named by ``key``
    in its reason. A temporary failure (a :class:`PacsError` marked transient) is ``retry``."""
    message = str(error)
    for text in sorted((str(h) for h in hidden if str(h)), key=len, reverse=True):  # a folder before its parent
        message = message.replace(text, key)
    temporary = isinstance(error, PacsError) and error.transient
    if temporary:
        message += " (a temporary failure: a rerun with the same --csv tries it again)"
    log.warning("%s: %s", key, message)
    return StudyOutcome(key, RETRY if temporary else "error", reason=message)


def append_outcome(csv_path: str | Path, outcome: StudyOutcome) -> None:
    """One row for ``outcome`` appended to ``csv_path`` (the columns of ``pacs run --csv``)."""
    writer = _OutcomeWriter(csv_path)
    try:
        writer.write(outcome)
    finally:
        writer.close()


class _OutcomeWriter:
    def __init__(self, path: str | Path):
        path = Path(path)
        new = not path.is_file() or path.stat().st_size == 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", newline="")  # noqa: SIM115 -- kept open for the run's rows; close() ends it
        self.writer = csv.DictWriter(self.file, fieldnames=OUTCOME_FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, o: StudyOutcome) -> None:
        self.writer.writerow(
            {
                "study": o.key,
                "status": o.status,
                "label": o.label,
                "probability": "" if o.probability is None else round(o.probability, 6),
                "stored": o.stored,
                "already_there": o.already,
                "reason": o.reason,
            }
        )
        self.file.flush()

    def close(self) -> None:
        self.file.close()


__all__ = [
    "run_studies",
    "answer_study",
    "failed_outcome",
    "append_outcome",
    "StudyOutcome",
    "finished_keys",
    "OUTCOME_FIELDS",
    "RETRY",
]
