"""``medtl pacs listen``: a C-STORE SCP (pynetdicom) that modalities and DICOM routers send studies to; each study
is answered once it is complete.

- **who may send**: only the calling AE titles of the allow-list; any other association is rejected
  ("calling AE title not recognised"). The listener accepts the image storage SOP classes (and Verification,
  for C-ECHO), in the transfer syntaxes medtl's readers decode (:func:`medtl.clinical.dimse.transfer_syntaxes`).
- **at rest**: received instances are written to a private spool (a 0700 temporary folder, one 0700 folder per
  study, 0600 files), named by hashes, never by what they hold.
- **complete**: a study is complete when no instance of it has arrived for ``quiet`` seconds; it is then
  answered once (:func:`medtl.clinical.pacs_run.answer_study`: predict, write its SR and Secondary Capture
  into ``OUT/study-KEY``, store them in a PACS if one is given) and its images are deleted. Instances of the
  study that arrive later make a new batch (answered in ``OUT/study-KEY-2``, ...).
- **stopping**: SIGTERM or Ctrl-C stops the server and removes the spool: no received image stays on disk.

Logs name studies by key (:func:`medtl.clinical.pacs.study_key`), never by UID or patient.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # (generated at import)

from medtl.clinical.dimse import (
    CANNOT_UNDERSTAND,
    DEFAULT_AE_TITLE,
    check_ae_title,
    image_contexts,
    instance_file_name,
    write_private,
)
from medtl.clinical.pacs import study_key
from medtl.clinical.signals import handling_signals
from medtl.errors import ConfigError

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from medtl.clinical.dimse import DimsePacs
    from medtl.clinical.pacs import Pacs
    from medtl.clinical.pacs_run import StudyOutcome
    from medtl.predict.predictor import Predictor

log = logging.getLogger("medtl.clinical.dimse")
OUTCOMES_CSV = "studies.csv"  # in OUT: one row per study answered (the columns of ``pacs run --csv``)


@dataclass
class _Batch:
    """The instances of a study received since its last batch was taken."""

    key: str  # the study's key
    folder: Path  # spool/KEY for its first batch, spool/KEY-2 for the next, ...
    last: float  # time.monotonic() of the latest instance
    count: int = 0
    files: set[str] = field(default_factory=set)


class StudyListener:
    """A C-STORE SCP on ``host:port`` for AE ``ae_title``, accepting associations from the ``allow`` AE titles
    only, spooling each study's instances privately under ``spool_parent`` (the system's temporary folder by
    default). :meth:`complete` hands over the studies that have been quiet long enough. Use as a context
    manager, or :meth:`start` / :meth:`stop` (which removes the spool and what it holds)."""

    def __init__(
        self,
        port: int,
        allow: list[str],
        ae_title: str = DEFAULT_AE_TITLE,
        host: str = "",
        spool_parent: str | Path | None = None,
    ):
        if not allow:
            raise ConfigError(None, "no AE title may send to the listener", "--allow AE1,AE2 (the modalities' titles)")
        self.allow = [check_ae_title(a, "allowed AE title") for a in allow]
        self.ae_title = check_ae_title(ae_title, "the listener's AE title")
        self.host, self.port, self.spool_parent = host, port, spool_parent
        self.spool: Path | None = None
        self._batches: dict[str, _Batch] = {}
        self._taken: dict[str, int] = {}  # study key -> batches handed over so far
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> StudyListener:
        self.spool = Path(tempfile.mkdtemp(prefix="medtl-listen-", dir=self.spool_parent))  # 0700
        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = self.allow
        ae.supported_contexts = image_contexts() + [build_context(Verification)]
        ae.maximum_associations = 16
        handlers: list = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        try:
            server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as e:
            shutil.rmtree(self.spool, ignore_errors=True)
            raise ConfigError(None, f"cannot listen on port {self.port} ({e.strerror})", "a free port") from None
        assert server is not None  # (block=False: the server is returned)
        self._server, self.port = server, server.server_address[1]
        log.info("listening as AE %s on port %d for %s", self.ae_title, self.port, ", ".join(self.allow))
        return self

    def _on_rejected(self, event) -> None:
        log.warning("rejected an association from AE %r (not in the allow-list)", event.assoc.requestor.ae_title)

    def _on_store(self, event) -> int:
        ds = event.dataset
        uid = str(ds.get("StudyInstanceUID", ""))
        if not uid:
            log.warning("an instance without a StudyInstanceUID: refused")
            return CANNOT_UNDERSTAND
        key = study_key(uid)
        name = instance_file_name(event.request.AffectedSOPInstanceUID)
        data = event.encoded_dataset()
        with self._lock:  # (a batch is not handed over while one of its files is being written)
            if self.spool is None:
                return 0xA700  # stopping: out of resources
            batch = self._batches.get(key)
            if batch is None:
                n = self._taken.get(key, 0) + 1
                folder = self.spool / (key if n == 1 else f"{key}-{n}")
                folder.mkdir(mode=0o700)
                (folder / "images").mkdir(mode=0o700)
                batch = self._batches[key] = _Batch(key, folder, time.monotonic())
            write_private(batch.folder / "images" / name, data)
            batch.files.add(name)
            batch.count += 1
            batch.last = time.monotonic()
        log.debug("%s: instance received (%d so far)", batch.key, len(batch.files))
        return 0x0000

    def complete(self, quiet: float) -> list[tuple[str, Path]]:
        """(key, folder) of each study without a new instance for ``quiet`` seconds, handed over to the caller
        (its images in ``folder/images``; the caller deletes the folder): a later instance of the study starts
        a new batch, in a folder named ``KEY-2``, ``KEY-3``..."""
        now, ready = time.monotonic(), []
        with self._lock:
            for key, batch in list(self._batches.items()):
                if now - batch.last >= quiet:
                    del self._batches[key]
                    self._taken[key] = self._taken.get(key, 0) + 1
                    ready.append((batch.key, batch.folder))
                    log.info("%s: complete, %d instances", batch.key, len(batch.files))
        return ready

    def stop(self) -> None:
        """Stop the server (open associations are aborted) and remove the spool with every image in it."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._lock:
            spool, self.spool = self.spool, None
            left = sum(b.count for b in self._batches.values())
            self._batches.clear()
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)
            if left:
                log.warning("stopped: %d received instances of unanswered studies removed", left)

    def __enter__(self) -> StudyListener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    """SIGTERM (a service stopped) ends :func:`listen` as Ctrl-C does, so that the spool is removed."""
    raise KeyboardInterrupt


def listen(
    predictor: Predictor,
    listener: StudyListener,
    out: str | Path,
    quiet: float = 10.0,
    pacs: Pacs | DimsePacs | None = None,
    method: str | None = None,
    check: bool = True,
    poll: float = 0.2,
    max_studies: int | None = None,
    on_start: Callable[[StudyListener], object] | None = None,
) -> list[StudyOutcome]:
    """Run ``listener`` and answer each study it completes (quiet for ``quiet`` seconds): results into
    ``out/KEY`` (``out/KEY-2``... for a later batch of a study; private: they carry the patient's identifiers,
    to be filed with the images), a row in ``out/studies.csv``, the results stored in ``pacs`` if given; the
    study's images deleted. Until SIGTERM or Ctrl-C (or ``max_studies`` answered); the outcomes. ``on_start`` is
    called with the listener once it listens."""
    from medtl.clinical.pacs_run import answer_study, append_outcome

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    outcomes: list[StudyOutcome] = []
    try:
        with handling_signals(_interrupt), listener:
            if on_start is not None:
                on_start(listener)
            while max_studies is None or len(outcomes) < max_studies:
                for key, folder in listener.complete(quiet):
                    results = _new_folder(out, key)
                    try:
                        outcome = answer_study(predictor, folder / "images", results, key, pacs, method, check)
                    finally:
                        shutil.rmtree(folder, ignore_errors=True)  # the images: not kept
                    _private_files(results)
                    append_outcome(out / OUTCOMES_CSV, outcome)
                    outcomes.append(outcome)
                time.sleep(poll)
    except KeyboardInterrupt:
        log.info("stopped: %d studies answered", len(outcomes))
    return outcomes


def _new_folder(out: Path, key: str) -> Path:
    """``out/KEY``, or ``out/KEY-2``, ``-3``... when a batch of the study was answered before (in this run or an
    earlier one): results are never overwritten."""
    n, target = 1, out / key
    while target.exists():
        n += 1
        target = out / f"{key}-{n}"
    return target


def _private_files(folder: Path) -> None:
    if folder.is_dir():
        folder.chmod(0o700)
        for f in folder.iterdir():
            if f.is_file():
                os.chmod(f, 0o600)


__all__ = ["StudyListener", "listen", "OUTCOMES_CSV"]
