"""A PACS over DICOMweb: query studies (QIDO-RS), retrieve them (WADO-RS) and store results (STOW-RS), with
``dicomweb-client``. Running a model on studies is :mod:`medtl.clinical.pacs_run`; a PACS started by medtl
(Orthanc) is :mod:`medtl.clinical.orthanc`. This module imports neither torch nor the model code, so that
``medtl pacs query`` answers at once.

Credentials come from the environment (``MEDTL_PACS_USER``, ``MEDTL_PACS_PASSWORD``) or a file (JSON
``{"user": ..., "password": ...}`` or one ``user:password`` line), never from the command line; they
and the query values (a patient ID, an accession number) are kept out of logs: studies are named by
a key, a hash of their StudyInstanceUID.

A temporary failure (the PACS cannot be reached, does not answer in time, or answers HTTP 5xx) is retried
with back-off; if it persists, the :class:`PacsError` says it is temporary (``transient``), and a run records
the study as to be retried. A refusal (HTTP 4xx) is not retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pydicom

from medtl.errors import ConfigError, MedtlError, MedtlInputError

log = logging.getLogger("medtl.clinical.pacs")
T = TypeVar("T")
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


# WADO-RS: the instances as the PACS holds them (JPEG 2000, JPEG-LS, ...; the readers decode them), not
# transcoded to the default Explicit VR Little Endian, which a PACS may fail to do (Orthanc: HTTP 500)
AS_STORED = (("application/dicom", "*"),)


class PacsError(MedtlError):
    """The PACS cannot be reached, refused the credentials or a request, or answered something unusable.
    ``transient``: the failure is temporary (unreachable, no answer in time, HTTP 5xx) and worth retrying."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def study_key(study_uid: str) -> str:
    """A key naming a DICOM study without its UID (which can be traced to the patient): ``study-`` and the first
    12 hex digits of the UID's sha256 (as :func:`medtl.predict.batch.study_input_key`, without its imports)."""
    return "study-" + hashlib.sha256(str(study_uid).encode()).hexdigest()[:12]


def study_record(ds: pydicom.Dataset) -> dict | None:
    """A study a query found (its StudyInstanceUID, StudyDate, ModalitiesInStudy and
    NumberOfStudyRelatedInstances), as :meth:`Pacs.query` lists it: ``{"study_uid", "key", "date", "modalities",
    "instances"}``; None without a StudyInstanceUID."""
    uid = str(ds.get("StudyInstanceUID", ""))
    if not uid:
        return None
    modalities = ds.get("ModalitiesInStudy", [])
    return {
        "study_uid": uid,
        "key": study_key(uid),
        "date": str(ds.get("StudyDate", "")),
        "modalities": "/".join([modalities] if isinstance(modalities, str) else modalities),
        "instances": int(ds.get("NumberOfStudyRelatedInstances", 0) or 0),
    }


def retried(fn: Callable[[], T], retries: int, backoff: float, logger: logging.Logger = log) -> T:
    """``fn()``, tried again while it fails temporarily (a transient :class:`PacsError`): at most ``retries``
    times, after ``backoff``, then 2x, 4x... seconds (each said to ``logger``); the last failure, or one not
    temporary, is raised."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except PacsError as e:
            if not e.transient or attempt == retries:
                raise
            delay = backoff * 2**attempt
            logger.warning("%s; trying again in %.0f s (%d of %d)", e, delay, attempt + 1, retries)
            time.sleep(delay)
    raise AssertionError("unreachable")


def instance_file_name(sop_instance_uid: str) -> str:
    """A retrieved instance's file name: a hash of its SOPInstanceUID (no patient data)."""
    return hashlib.sha256(str(sop_instance_uid).encode()).hexdigest()[:16] + ".dcm"


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

    def __init__(
        self,
        url: str,
        credentials: Credentials | None = None,
        timeout: float = 30,
        retries: int = 3,
        backoff: float = 2.0,
    ):
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
        self.retries, self.backoff = retries, backoff  # a temporary failure: tried again after backoff, 2x, 4x s
        self.client = DICOMwebClient(self.url, session=_session(credentials), timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # medtl retries, only what is worth retrying

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried with back-off while it fails temporarily; a failure is a PacsError."""
        return retried(lambda: self._call_once(what, fn, *args, **kwargs), self.retries, self.backoff)

    def _call_once(self, what: str, fn, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            reason = {401: "refused the credentials", 403: "forbids it"}.get(code, "answered an error")
            temporary = code >= 500 or code in (408, 429)  # the server's trouble, or "too many requests": retried
            raise PacsError(f"{what}: the PACS at {self.url} {reason} (HTTP {code or '?'})", temporary) from None
        except requests.ConnectionError:
            raise PacsError(f"{what}: the PACS at {self.url} cannot be reached (is it running?)", True) from None
        except requests.Timeout:
            raise PacsError(f"{what}: the PACS at {self.url} did not answer in time", True) from None
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
        records = (study_record(pydicom.Dataset.from_json(item)) for item in found)
        return [r for r in records if r is not None]

    def retrieve(self, study_uid: str, folder: str | Path) -> list[Path]:
        """The study's image series (not its reports, presentation states or medtl's own results) written
        into ``folder`` (WADO-RS), one file per instance; the files written."""
        key = study_key(study_uid)
        series = self._call(f"{key}: series query", self.client.search_for_series, study_uid)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        written = []
        for item in series:
            ds = pydicom.Dataset.from_json(item)
            uid, modality = str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", ""))
            if not uid or modality in NOT_IMAGES:
                continue
            for inst in self._call(
                f"{key}: retrieval", self.client.retrieve_series, study_uid, uid, media_types=AS_STORED
            ):
                if str(inst.get("Manufacturer", "")) == "medtl":  # a result of an earlier run
                    continue
                target = folder / instance_file_name(inst.SOPInstanceUID)
                inst.save_as(target, enforce_file_format=False)
                written.append(target)
        if not written:
            raise MedtlInputError(None, f"{key}: the study holds no image series medtl can read")
        return written

    def has_instance(self, study_uid: str, sop_instance_uid: str) -> bool:
        found = self._call(
            f"{study_key(study_uid)}: instance query",
            self.client.search_for_instances,
            study_uid,
            search_filters={"SOPInstanceUID": sop_instance_uid},
        )
        return bool(found)

    def store(self, datasets: Sequence[pydicom.Dataset]) -> tuple[int, int]:
        """Store ``datasets`` (STOW-RS) except those the PACS already holds; (stored, already there)."""
        todo = [ds for ds in datasets if not self.has_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))]
        if todo:
            key = study_key(str(todo[0].StudyInstanceUID))
            response = self._call(f"{key}: storing the results", self.client.store_instances, todo)
            failed = response.get("FailedSOPSequence") if response is not None else None
            if failed:
                raise PacsError(f"{key}: the PACS rejected {len(failed)} of {len(todo)} results")
        return len(todo), len(datasets) - len(todo)


__all__ = ["Pacs", "PacsError", "Credentials", "instance_file_name", "retried", "study_key", "study_record"]
