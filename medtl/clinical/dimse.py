"""A PACS over DICOM's own network protocol (DIMSE), with pynetdicom: for a PACS without DICOMweb. The PACS is
named by a URL ``dimse://AE@host:port`` (its AE title, host and DICOM port); medtl calls it with its own AE
title (``MEDTL`` by default), which the PACS must know.

:class:`DimsePacs` answers as :class:`medtl.clinical.pacs.Pacs` does, so that ``pacs query`` and ``pacs run``
(:func:`medtl.clinical.pacs_run.run_studies`) take either:

- **query**: C-FIND at STUDY level (Study Root);
- **retrieve**: C-GET of each image series on one association (the PACS sends the instances back on it), or
  C-MOVE to medtl's own AE, received by a storage SCP that medtl starts on ``move_port`` for the retrieval
  (the PACS must know that AE's host and port: Orthanc's ``DicomModalities``);
- **store**: C-STORE of the results, except those a C-FIND at IMAGE level finds already there.

The instances are accepted in the transfer syntaxes that medtl's readers decode (JPEG 2000, JPEG-LS, RLE and
JPEG baseline where their decoders are installed), as the PACS holds them. The receiving side of
``medtl pacs listen`` (a C-STORE SCP for modalities and routers) is :mod:`medtl.clinical.dimse_listen`.

A temporary failure (the PACS cannot be reached, does not answer in time, aborts, or is out of resources) is
retried with back-off, and then a transient :class:`PacsError`; a rejected association or a refusal is not
retried. pynetdicom logs request and response identifiers (patient IDs, names) at INFO: its logger is kept
at WARNING; medtl logs studies by key only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # (generated at import)
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from medtl.clinical.pacs import NOT_IMAGES, PacsError, instance_file_name, retried, study_key, study_record
from medtl.errors import ConfigError, MedtlInputError

log = logging.getLogger("medtl.clinical.dimse")
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines hold the identifiers of each request
logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)  # "cannot connect": said by a PacsError

T = TypeVar("T")
SCHEME = "dimse"
DEFAULT_AE_TITLE = "MEDTL"
NATIVE = (
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
)
COMPRESSED = (
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
    pydicom.uid.RLELossless,
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLossless,
    pydicom.uid.HTJ2KLossless,
    pydicom.uid.HTJ2K,
)
# the image storage SOP classes (CT, MR, CR, DX, MG, US, PET, NM, XA, Secondary Capture, ...): what medtl reads
IMAGE_STORAGE = tuple(
    str(c.abstract_syntax) for c in AllStoragePresentationContexts if "Image" in UID(c.abstract_syntax or "").name
)
# C-GET: the classes retrieved (a context per transfer syntax, each class's instances sent as the PACS holds
# them, within DICOM's 128 contexts an association may propose); C-MOVE receives every image class
GET_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX, for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX, for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG, for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # MG, for processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.3.1",  # US multi-frame
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
    "1.2.840.10008.5.1.4.1.1.12.2",  # RF
)
SUCCESS, PENDING, WARNING_SUBOPS = 0x0000, (0xFF00, 0xFF01), 0xB000
CANNOT_UNDERSTAND = 0xC211  # C-STORE: refused (an instance medtl did not ask for, or without its study)
STORED = (SUCCESS, 0xB000, 0xB006, 0xB007)  # C-STORE: success, or a warning (coerced, elements discarded)


def transfer_syntaxes() -> list[str | UID]:
    """The transfer syntaxes accepted for images: uncompressed, and the compressed ones whose decoder is
    installed (pydicom's pixel decoders: pylibjpeg, its openjpeg and rle plugins, pyjpegls, gdcm)."""
    return [*NATIVE, *(ts for ts in COMPRESSED if get_decoder(ts).is_available)]


def image_contexts() -> list[PresentationContext]:
    """A presentation context per image storage SOP class, with :func:`transfer_syntaxes`."""
    syntaxes = transfer_syntaxes()
    return [build_context(uid, syntaxes) for uid in IMAGE_STORAGE]


def get_contexts() -> list[PresentationContext]:
    """The contexts a C-GET proposes for the instances it receives: per class of :data:`GET_CLASSES`, one with
    the uncompressed transfer syntaxes and one per compressed syntax (JPEG 2000, JPEG-LS, RLE, JPEG baseline)
    decodable here, so that the PACS sends an instance as it holds it rather than transcoding it."""
    compressed = [ts for ts in COMPRESSED[:6] if get_decoder(ts).is_available]
    return [build_context(uid, list(NATIVE)) for uid in GET_CLASSES] + [
        build_context(uid, ts) for uid in GET_CLASSES for ts in compressed
    ]


@dataclass(frozen=True)
class DimseAddress:
    """A DICOM peer: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> DimseAddress:
        """``dimse://AE@host:port``."""
        parts = urlsplit(url)
        expected = "dimse://AE@host:port (the PACS's AE title, host and DICOM port)"
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != SCHEME or not parts.username or not parts.hostname or not port or parts.password:
            raise ConfigError(None, f"DIMSE address {url!r}", expected)
        return cls(check_ae_title(parts.username, "the PACS's AE title"), parts.hostname, port)

    def __str__(self) -> str:
        return f"{SCHEME}://{self.ae_title}@{self.host}:{self.port}"


def is_dimse_url(url: str) -> bool:
    return urlsplit(url).scheme == SCHEME


def check_ae_title(title: str, what: str = "AE title") -> str:
    """``title`` if it is a valid AE title (1 to 16 characters, no backslash or control character)."""
    title = title.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or any(ord(c) < 32 for c in title):
        raise ConfigError(None, f"{what} {title!r}", "1 to 16 characters, no backslash")
    return title


def write_private(path: Path, data: bytes) -> None:
    """``data`` into ``path``, readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class _Receiver:
    """The C-STORE handler of a retrieval: each image instance of ``study_uid`` into ``folder`` (medtl's own results
    of an earlier run are acknowledged and dropped; an instance of another study is refused)."""

    def __init__(self, folder: Path, study_uid: str):
        self.folder, self.study_uid = folder, study_uid
        self.written: list[Path] = []
        self.lock = threading.Lock()

    def __call__(self, event) -> int:
        ds = event.dataset
        if str(ds.get("StudyInstanceUID", "")) != self.study_uid:
            log.warning("%s: an instance of another study was sent: refused", study_key(self.study_uid))
            return CANNOT_UNDERSTAND
        if str(ds.get("Manufacturer", "")) == "medtl" or str(ds.get("Modality", "")) in NOT_IMAGES:
            return SUCCESS
        target = self.folder / instance_file_name(event.request.AffectedSOPInstanceUID)
        write_private(target, event.encoded_dataset())
        with self.lock:
            self.written.append(target)
        return SUCCESS


class DimsePacs:
    """A PACS over DIMSE at ``url`` (``dimse://AE@host:port``), called as ``ae_title``. Retrieval by C-GET, or by
    C-MOVE to ``ae_title`` at this machine's ``move_port`` when given."""

    def __init__(
        self,
        url: str,
        ae_title: str = DEFAULT_AE_TITLE,
        timeout: float = 30,
        retries: int = 3,
        backoff: float = 2.0,
        move_port: int | None = None,
    ):
        self.address = DimseAddress.parse(url)
        self.url = str(self.address)
        self.ae_title = check_ae_title(ae_title, "medtl's AE title")
        self.timeout, self.retries, self.backoff, self.move_port = timeout, retries, backoff, move_port

    def _ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        return ae

    @contextlib.contextmanager
    def _association(self, what: str, contexts: list, roles: list | None = None, handlers: list | None = None):
        ae = self._ae()
        ae.requested_contexts = contexts
        assoc = ae.associate(
            self.address.host,
            self.address.port,
            ae_title=self.address.ae_title,
            ext_neg=roles or None,
            evt_handlers=handlers or None,
        )
        if not assoc.is_established:
            if assoc.is_rejected:  # (an unknown AE title, most often: not worth retrying)
                raise PacsError(f"{what}: the PACS at {self.url} rejected the association from AE {self.ae_title}")
            raise PacsError(f"{what}: the PACS at {self.url} cannot be reached (is it running?)", True)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with back-off while it fails temporarily (as :class:`Pacs` does)."""
        return retried(fn, self.retries, self.backoff, log)

    def _responses(self, what: str, responses: Iterator) -> Iterator[Dataset]:
        """The identifiers of the pending responses; a failure status is a PacsError."""
        for status, identifier in responses:
            code = status.get("Status") if status else None
            if code is None:  # (pynetdicom: an empty status when the association ended or timed out)
                raise PacsError(
                    f"{what}: the PACS at {self.url} ended the association without answering (is AE {self.ae_title} "
                    "known to it?)",
                    True,
                )
            if code in PENDING:
                if identifier is not None:
                    yield identifier
                continue
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            if code == SUCCESS or (code == WARNING_SUBOPS and not failed):
                return
            detail = f", {failed} instances not sent" if failed else ""
            temporary = code & 0xFF00 == 0xA700  # out of resources
            raise PacsError(f"{what}: the PACS at {self.url} answered status 0x{code:04X}{detail}", temporary)

    def _find(self, what: str, identifier: Dataset) -> list[Dataset]:
        model = StudyRootQueryRetrieveInformationModelFind

        def once() -> list[Dataset]:
            with self._association(what, [build_context(model)]) as assoc:
                return list(self._responses(what, assoc.send_c_find(identifier, model)))

        return self._retrying(what, once)

    def query(
        self,
        patient_id: str | None = None,
        study_date: str | None = None,
        modality: str | None = None,
        accession: str | None = None,
        study_uid: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Studies matching every filter given (C-FIND, STUDY level): as :meth:`Pacs.query`."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid or ""
        ds.StudyDate = study_date or ""
        ds.ModalitiesInStudy = modality or ""
        ds.NumberOfStudyRelatedInstances = ""
        if patient_id:
            ds.PatientID = patient_id
        if accession:
            ds.AccessionNumber = accession
        studies = [r for r in map(study_record, self._find("study query", ds)) if r is not None]
        return studies[:limit] if limit else studies

    def retrieve(self, study_uid: str, folder: str | Path) -> list[Path]:
        """The study's image series (not its reports, presentation states or medtl's own results) written into
        ``folder`` (0700), one file (0600) per instance, as the PACS holds them; the files written."""
        key = study_key(study_uid)
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.Modality = ""
        series = [
            str(s.SeriesInstanceUID)
            for s in self._find(f"{key}: series query", ds)
            if s.get("SeriesInstanceUID") and str(s.get("Modality", "")) not in NOT_IMAGES
        ]
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        receiver = _Receiver(folder, study_uid)
        with self._move_destination(receiver) if self.move_port else contextlib.nullcontext():
            for uid in series:
                request = Dataset()
                request.QueryRetrieveLevel = "SERIES"
                request.StudyInstanceUID = study_uid
                request.SeriesInstanceUID = uid
                self._retrying(f"{key}: retrieval", functools.partial(self._fetch, key, request, receiver))
        if not receiver.written:
            raise MedtlInputError(None, f"{key}: the study holds no image series medtl can read")
        return sorted(set(receiver.written))

    def _fetch(self, key: str, request: Dataset, receiver: _Receiver) -> None:
        """C-MOVE to medtl's own AE (with ``move_port``), else C-GET: the instances to ``receiver``."""
        if self.move_port:
            model, how = StudyRootQueryRetrieveInformationModelMove, "C-MOVE"
            contexts, roles, handlers = [build_context(model)], None, None
        else:
            model, how = StudyRootQueryRetrieveInformationModelGet, "C-GET"
            contexts = [build_context(model)] + get_contexts()
            roles = [build_role(uid, scp_role=True) for uid in GET_CLASSES]
            handlers = [(evt.EVT_C_STORE, receiver)]
        what = f"{key}: retrieval ({how})"
        with self._association(what, contexts, roles, handlers) as assoc:
            if self.move_port:
                responses = assoc.send_c_move(request, self.ae_title, model)
            else:
                responses = assoc.send_c_get(request, model)
            for _ in self._responses(what, responses):
                pass

    @contextlib.contextmanager
    def _move_destination(self, receiver: _Receiver):
        """A storage SCP for medtl's AE on ``move_port`` while a C-MOVE retrieval runs (every image class, in
        the transfer syntaxes the PACS proposes: as it holds them), accepting the PACS's AE title only."""
        scp = self._ae()
        scp.supported_contexts = image_contexts()
        scp.require_calling_aet = [self.address.ae_title]  # the PACS's sub-operations, no one else's
        server = scp.start_server(
            ("", int(self.move_port or 0)), block=False, evt_handlers=[(evt.EVT_C_STORE, receiver)]
        )
        try:
            yield server
        finally:
            if server is not None:
                server.shutdown()

    def has_instance(self, ds: Dataset) -> bool:
        """Whether the PACS holds ``ds``'s instance (C-FIND, IMAGE level)."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = ds.StudyInstanceUID
        query.SeriesInstanceUID = ds.SeriesInstanceUID
        query.SOPInstanceUID = ds.SOPInstanceUID
        return bool(self._find(f"{study_key(str(ds.StudyInstanceUID))}: instance query", query))

    def store(self, datasets: Sequence[Dataset]) -> tuple[int, int]:
        """Store ``datasets`` (C-STORE) except those the PACS already holds; (stored, already there)."""
        todo = [ds for ds in datasets if not self.has_instance(ds)]
        if not todo:
            return 0, len(datasets)
        key = study_key(str(todo[0].StudyInstanceUID))
        what = f"{key}: storing the results"
        syntaxes = {str(ds.SOPClassUID): getattr(ds.file_meta, "TransferSyntaxUID", None) for ds in todo}
        contexts = [
            build_context(cls, list(dict.fromkeys([ts or pydicom.uid.ExplicitVRLittleEndian, *NATIVE[:2]])))
            for cls, ts in syntaxes.items()
        ]

        def once() -> int:
            with self._association(what, contexts) as assoc:
                statuses = [assoc.send_c_store(ds) for ds in todo]
            if any(not s for s in statuses):
                raise PacsError(f"{what}: the PACS at {self.url} stopped answering", True)
            return sum(int(s.Status) not in STORED for s in statuses)

        failed = self._retrying(what, once)
        if failed:
            raise PacsError(f"{key}: the PACS rejected {failed} of {len(todo)} results")
        return len(todo), len(datasets) - len(todo)


__all__ = [
    "DimsePacs",
    "DimseAddress",
    "CANNOT_UNDERSTAND",
    "DEFAULT_AE_TITLE",
    "IMAGE_STORAGE",
    "check_ae_title",
    "image_contexts",
    "instance_file_name",
    "is_dimse_url",
    "transfer_syntaxes",
    "write_private",
]
