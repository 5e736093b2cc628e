"""A PACS over DICOMweb: query studies (QIDO-RS), retrieve them (WADO-RS), run a model, store the results
back (STOW-RS), with ``dicomweb-client``; and :class:`OrthancServer`, a real PACS (Orthanc with its
DICOMweb plugin) started on loopback with a configuration medtl writes.

Credentials come from the environment (``MEDTL_PACS_USER``, ``MEDTL_PACS_PASSWORD``) or a file (JSON
``{"user": ..., "password": ...}`` or one ``user:password`` line), never from the command line; they
and the query values (a patient ID, an accession number) are kept out of logs: studies are named by
a key, a hash of their StudyInstanceUID.

``run_studies`` answers each study with a Structured Report and a Secondary Capture of the saliency
overlay (:func:`medtl.clinical.dicom_results.write_dicom_results`), stored in the study. Their UIDs derive
from the source instances and the model's weights, and a result the PACS already holds is not sent
again: re-running stores nothing twice. A study that cannot be retrieved, read or stored is reported
with its key and the reason; the others go on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom

from medtl.clinical.dicom_results import write_dicom_results
from medtl.errors import ConfigError, MedtlError, MedtlInputError
from medtl.predict.batch import done_keys, study_input_key
from medtl.predict.predictor import Predictor

log = logging.getLogger("medtl.clinical.pacs")
# the HTTP libraries log URLs, which carry the query (a patient ID, an accession number): kept quiet
for _name in ("dicomweb_client", "urllib3", "requests"):
    logging.getLogger(_name).setLevel(logging.WARNING)

USER_ENV, PASSWORD_ENV = "MEDTL_PACS_USER", "MEDTL_PACS_PASSWORD"
NOT_IMAGES = ("SR", "KO", "PR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "AU", "ECG")
STUDY_FIELDS = (
    "StudyInstanceUID",
    "StudyDate",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "NumberOfStudyRelatedSeries",
)


class PacsError(MedtlError):
    """The PACS cannot be reached, refused the credentials or a request, or answered something unusable."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Credentials | None:
        """From the file ``path`` (JSON or ``user:password``), else from ``$MEDTL_PACS_USER`` /
        ``$MEDTL_PACS_PASSWORD``; None when neither is given (a PACS without authentication)."""
        if path is not None:
            try:
                text = Path(path).read_text().strip()
            except OSError as e:
                raise ConfigError(path, f"cannot read the credentials ({e.strerror})") from None
            try:
                data = json.loads(text)
                user, password = data["user"], data["password"]
            except (ValueError, KeyError, TypeError):
                user, sep, password = text.partition(":")
                if not sep or "\n" in text:
                    raise ConfigError(
                        path,
                        "no credentials in the file",
                        'JSON {"user": ..., "password": ...} or one user:password line',
                    ) from None
            return cls(str(user), str(password))
        user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
        if user is None and password is None:
            return None
        if not user or password is None:
            raise ConfigError(None, f"only one of ${USER_ENV} and ${PASSWORD_ENV} is set", "both, or neither")
        return cls(user, password)


def _session(credentials: Credentials | None):
    import requests

    session = requests.Session()
    if credentials is not None:
        session.auth = (credentials.user, credentials.password)
    return session


class Pacs:
    """A DICOMweb service (e.g. ``http://127.0.0.1:8042/dicom-web``)."""

    def __init__(self, url: str, credentials: Credentials | None = None, timeout: float = 30):
        from dicomweb_client.api import DICOMwebClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(None, f"PACS URL {url!r}", "an http(s) URL of the DICOMweb service")
        if parts.username or parts.password:
            raise ConfigError(
                None,
                "credentials in the PACS URL (they would show in process lists and logs)",
                f"a credentials file or ${USER_ENV} / ${PASSWORD_ENV}",
            )
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(self.url, session=_session(credentials), timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # a failure is reported at once, the batch goes on

    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            reason = {401: "refused the credentials", 403: "forbids it"}.get(code, "answered an error")
            raise PacsError(f"{what}: the PACS at {self.url} {reason} (HTTP {code})") from None
        except requests.ConnectionError:
            raise PacsError(f"{what}: the PACS at {self.url} cannot be reached (is it running?)") from None
        except requests.Timeout:
            raise PacsError(f"{what}: the PACS at {self.url} did not answer in time") from None
        except requests.RequestException as e:
            raise PacsError(f"{what}: {type(e).__name__} talking to {self.url}") from None

    def query(
        self,
        patient_id: str | None = None,
        study_date: str | None = None,
        modality: str | None = None,
        accession: str | None = None,
        study_uid: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Studies matching every filter given (QIDO-RS): a list of ``{"study_uid", "key", "date",
        "modalities", "instances"}``. ``study_date`` is a date or a range ``YYYYMMDD-YYYYMMDD``."""
        filters = {
            k: v
            for k, v in (
                ("PatientID", patient_id),
                ("StudyDate", study_date),
                ("ModalitiesInStudy", modality),
                ("AccessionNumber", accession),
                ("StudyInstanceUID", study_uid),
            )
            if v
        }
        found = self._call(
            "study query",
            self.client.search_for_studies,
            search_filters=filters,
            fields=list(STUDY_FIELDS),
            limit=limit,
        )
        studies = []
        for item in found:
            ds = pydicom.Dataset.from_json(item)
            uid = str(ds.get("StudyInstanceUID", ""))
            if not uid:
                continue
            modalities = ds.get("ModalitiesInStudy", [])
            studies.append(
                {
                    "study_uid": uid,
                    "key": study_input_key(uid),
                    "date": str(ds.get("StudyDate", "")),
                    "modalities": "/".join([modalities] if isinstance(modalities, str) else modalities),
                    "instances": int(ds.get("NumberOfStudyRelatedInstances", 0) or 0),
                }
            )
        return studies

    def retrieve(self, study_uid: str, folder: str | Path) -> list[Path]:
        """The study's image series (not its reports, presentation states or medtl's own results) written
        into ``folder`` (WADO-RS), one file per instance; the files written."""
        key = study_input_key(study_uid)
        series = self._call(f"{key}: series query", self.client.search_for_series, study_uid)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        written = []
        for item in series:
            ds = pydicom.Dataset.from_json(item)
            uid, modality = str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", ""))
            if not uid or modality in NOT_IMAGES:
                continue
            for inst in self._call(f"{key}: retrieval", self.client.retrieve_series, study_uid, uid):
                if str(inst.get("Manufacturer", "")) == "medtl":  # a result of an earlier run
                    continue
                target = folder / (hashlib.sha256(str(inst.SOPInstanceUID).encode()).hexdigest()[:16] + ".dcm")
                inst.save_as(target, enforce_file_format=False)
                written.append(target)
        if not written:
            raise MedtlInputError(None, f"{key}: the study holds no image series medtl can read")
        return written

    def has_instance(self, study_uid: str, sop_instance_uid: str) -> bool:
        found = self._call(
            f"{study_input_key(study_uid)}: instance query",
            self.client.search_for_instances,
            study_uid,
            search_filters={"SOPInstanceUID": sop_instance_uid},
        )
        return bool(found)

    def store(self, datasets: list[pydicom.Dataset]) -> tuple[int, int]:
        """Store ``datasets`` (STOW-RS) except those the PACS already holds; (stored, already there)."""
        todo = [ds for ds in datasets if not self.has_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))]
        if todo:
            key = study_input_key(str(todo[0].StudyInstanceUID))
            response = self._call(f"{key}: storing the results", self.client.store_instances, todo)
            failed = response.get("FailedSOPSequence") if response is not None else None
            if failed:
                raise PacsError(f"{key}: the PACS rejected {len(failed)} of {len(todo)} results")
        return len(todo), len(datasets) - len(todo)


@dataclass
class StudyOutcome:
    key: str
    status: str  # answered, refused, error
    label: str = ""
    probability: float | None = None
    stored: int = 0
    already: int = 0
    reason: str = ""


OUTCOME_FIELDS = ["study", "status", "label", "probability", "stored", "already_there", "reason"]


def run_studies(
    predictor: Predictor,
    pacs: Pacs,
    study_uids: Iterable[str],
    cache: str | Path | None = None,
    store: bool = True,
    method: str | None = None,
    check: bool = True,
    csv_path: str | Path | None = None,
) -> list[StudyOutcome]:
    """Retrieve each study, predict, write its SR and Secondary Capture and store them back (unless
    ``store`` is False). A study's files live in ``cache`` (a private temporary folder by default,
    removed afterwards). One outcome per study; a failure is an outcome, not an exception. With
    ``csv_path``, a row per study is appended as it ends, and studies already in the file are skipped
    (an interrupted run resumes). ``check=False`` answers studies unlike the training images too."""
    study_uids = list(study_uids)
    done = done_keys(Path(csv_path), "study") if csv_path else set()
    todo = [uid for uid in study_uids if study_input_key(uid) not in done]
    if done:
        log.info("%d of %d studies already in %s", len(study_uids) - len(todo), len(study_uids), csv_path)
    outcomes = []
    own = tempfile.TemporaryDirectory(prefix="medtl-pacs-") if cache is None else None
    root = Path(own.name if own else cache)
    writer = _OutcomeWriter(csv_path) if csv_path else None
    t_start = time.perf_counter()
    try:
        for k, uid in enumerate(todo, 1):
            outcome = _run_study(predictor, pacs, uid, root, store, method, check)
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


def _run_study(
    predictor: Predictor, pacs: Pacs, uid: str, root: Path, store: bool, method: str | None, check: bool
) -> StudyOutcome:
    key = study_input_key(uid)
    t0 = time.perf_counter()
    folder = root / key
    try:
        files = pacs.retrieve(uid, folder / "images")
        results = write_dicom_results(predictor, folder / "images", folder / "results", method, check=check)
        datasets = [pydicom.dcmread(f) for f in results]
        sr, answered = datasets[0], len(datasets) > 1
        stored, already = pacs.store(datasets) if store else (0, 0)
        if answered:
            outcome = StudyOutcome(
                key,
                "answered",
                _content(sr, "Finding").ConceptCodeSequence[0].CodeMeaning,
                float(_content(sr, "Probability of finding").MeasuredValueSequence[0].NumericValue),
                stored,
                already,
            )
        else:
            outcome = StudyOutcome(
                key, "refused", stored=stored, already=already, reason=str(_content(sr, "Comment").TextValue)
            )
        log.info(
            "%s: %d images, %s%s, %d results stored, %d already there (%.1f s)",
            key,
            len(files),
            outcome.status,
            f" {outcome.label}" if answered else "",
            stored,
            already,
            time.perf_counter() - t0,
        )
        return outcome
    except MedtlError as e:
        message = str(e).replace(str(folder / "images"), key).replace(str(folder), key).replace(uid, key)
        log.warning("%s: %s", key, message)
        return StudyOutcome(key, "error", reason=message)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the study's images and results: not kept


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


def _content(sr: pydicom.Dataset, meaning: str) -> pydicom.Dataset:
    """The SR's content item named ``meaning`` (as :func:`medtl.clinical.dicom_results.write_dicom_results`
    writes it)."""
    return next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == meaning)


# -- a PACS started by medtl ---------------------------------------------------------------------

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")


def find_orthanc() -> tuple[str, str] | None:
    """(the Orthanc program, its DICOMweb plugin) when both are installed (Debian: ``orthanc``,
    ``orthanc-dicomweb``), else None."""
    program = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
    )
    plugin = next(
        (
            str(Path(d) / "libOrthancDicomWeb.so")
            for d in ORTHANC_PLUGIN_DIRS
            if (Path(d) / "libOrthancDicomWeb.so").is_file()
        ),
        None,
    )
    return (program, plugin) if program and plugin else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """Orthanc with its DICOMweb plugin, on loopback only (remote access off), authentication on, no
    DIMSE port, its storage in ``storage`` (a temporary folder, removed at stop, by default). Use as a
    context manager, or :meth:`start` / :meth:`stop`. The credentials are ``credentials`` or a new
    random password for user ``medtl`` (see :attr:`credentials`)."""

    def __init__(
        self, storage: str | Path | None = None, port: int | None = None, credentials: Credentials | None = None
    ):
        found = find_orthanc()
        if found is None:
            raise MedtlError(
                "Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
            )
        self.program, self.plugin = found
        self._own = tempfile.TemporaryDirectory(prefix="medtl-orthanc-") if storage is None else None
        self.storage = Path(self._own.name if self._own else storage)
        self.port = port or _free_port()
        self.credentials = credentials or Credentials("medtl", secrets.token_urlsafe(18))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def config(self) -> dict:
        return {
            "Name": "medtl",
            "StorageDirectory": str(self.storage / "db"),
            "IndexDirectory": str(self.storage / "db"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.credentials.user: self.credentials.password},
            "DicomServerEnabled": False,
            "OverwriteInstances": False,
            "StorageCompression": False,
            "Plugins": [self.plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "HttpTimeout": 60,
            "StableAge": 1,
        }

    def start(self, timeout: float = 60) -> OrthancServer:
        import requests

        self.storage.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = self.storage / "orthanc.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(), f, indent=1)
        self._log = open(self.storage / "orthanc.log", "wb")  # noqa: SIM115 -- the server's output; stop() closes it
        self.process = subprocess.Popen(
            [self.program, str(config)], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        auth = (self.credentials.user, self.credentials.password)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.storage / "orthanc.log").read_text(errors="replace")[-600:]
                raise MedtlError(f"Orthanc stopped at start (exit {self.process.returncode}): {tail}")
            try:
                if requests.get(f"{self.url}/studies", auth=auth, timeout=2).status_code == 200:
                    log.info("Orthanc %s on %s (storage %s)", self.program, self.url, self.storage)
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise MedtlError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log", None):
            self._log.close()
        if self._own is not None:
            self._own.cleanup()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def upload(self, files: Iterable[str | Path]) -> int:
        """Store DICOM files in this Orthanc over STOW-RS (as a modality or another PACS would); the
        number stored."""
        pacs = Pacs(self.url, self.credentials)
        datasets = [pydicom.dcmread(f) for f in files]
        return pacs.store(datasets)[0] if datasets else 0


__all__ = ["Pacs", "PacsError", "Credentials", "OrthancServer", "StudyOutcome", "run_studies", "find_orthanc"]
