"""``medtl pacs watch``: an unattended service that answers each new study of an Orthanc PACS once.

It follows Orthanc's REST change feed (``/changes``): a study is taken when Orthanc marks it stable
(``StableStudy``: no new instance for Orthanc's ``StableAge`` seconds), and run as ``medtl pacs run`` would
(:func:`medtl.clinical.pacs_run.run_studies`: retrieved into a private temporary folder, predicted, its SR
and Secondary Capture stored, a row in ``STATE/studies.csv``). The state folder (private, 0700) keeps:

- ``watch.json``: the last change handled (a restart goes on from there) and the studies to be tried again;
- ``studies.csv``: one row per study as ``pacs run --csv`` writes it; a study whose last row is final
  (answered, refused, error) is never run again, so the ``StableStudy`` that the results' own arrival causes,
  or a change read twice after a crash, does nothing;
- ``audit.jsonl``: one JSON line per study run (time, study key, status, seconds; no identifiers), also
  printed on standard output (the journal, under systemd).

A temporary failure (the PACS unreachable, slow, or answering HTTP 5xx) never stops the service: the study is
tried again later, and the feed is read again, after a back-off that doubles up to :data:`MAX_BACKOFF`
seconds. A refusal (HTTP 4xx) of the feed itself (a wrong password) stops it with an error. SIGTERM (or
Ctrl-C) stops it cleanly: between studies at once (exit 0), during a study by removing that study's images
(exit 143, the study is run again at the next start). ``GET /health`` on 127.0.0.1 answers the service's state
as JSON. A study is taken once, when it first becomes stable: images that arrive in it later are not run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from medtl.clinical.fhir import FhirOptions
from medtl.clinical.pacs import Credentials, Pacs, PacsError, study_key
from medtl.clinical.pacs_run import RETRY, finished_keys, run_studies
from medtl.clinical.signals import handling_signals
from medtl.errors import ConfigError, MedtlError
from medtl.predict.predictor import Predictor

log = logging.getLogger("medtl.clinical.watch")
MAX_BACKOFF = 900.0  # seconds: the longest wait before the feed, or a study that failed, is tried again
PAGE = 100  # changes read per request


class OrthancChanges:
    """Orthanc's REST API (``rest_url``, e.g. ``http://127.0.0.1:8042``): its change feed and study lookup.
    A failure is a :class:`~medtl.clinical.pacs.PacsError`, ``transient`` when worth trying again."""

    def __init__(self, rest_url: str, credentials: Credentials | None = None, timeout: float = 30):
        import requests

        self.url = rest_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if credentials is not None:
            self.session.auth = (credentials.user, credentials.password)

    def _get(self, what: str, path: str, **params) -> dict | list | None:
        """The JSON answer to ``GET path``; None when Orthanc answers 404 (no such resource)."""
        import requests

        try:
            r = self.session.get(self.url + path, params=params, timeout=self.timeout)
        except requests.ConnectionError:
            raise PacsError(f"{what}: Orthanc at {self.url} cannot be reached (is it running?)", True) from None
        except requests.Timeout:
            raise PacsError(f"{what}: Orthanc at {self.url} did not answer in time", True) from None
        except requests.RequestException as e:
            raise PacsError(f"{what}: {type(e).__name__} talking to {self.url}", True) from None
        if r.status_code == 404:
            return None
        if r.status_code >= 400:
            reason = {401: "refused the credentials", 403: "forbids it"}.get(r.status_code, "answered an error")
            temporary = r.status_code >= 500 or r.status_code in (408, 429)
            raise PacsError(f"{what}: Orthanc at {self.url} {reason} (HTTP {r.status_code})", temporary)
        try:
            return r.json()
        except ValueError:
            raise PacsError(f"{what}: {self.url} did not answer JSON (is it Orthanc?)") from None

    def check(self) -> None:
        """That ``url`` is Orthanc's REST API (``/system`` names its version)."""
        system = self._get("Orthanc's version", "/system")
        if not isinstance(system, dict) or "ApiVersion" not in system:
            raise ConfigError(
                None,
                f"{self.url}/system did not answer as Orthanc (watch follows Orthanc's /changes feed)",
                "Orthanc's REST root (--orthanc), or `medtl pacs run` on a schedule for another PACS",
            )

    def last(self) -> int:
        """The sequence number of the feed's last change (0 when empty)."""
        answer = self._get("the change feed", "/changes", last="")
        return int(answer.get("Last", 0)) if isinstance(answer, dict) else 0

    def stable_studies(self, since: int) -> tuple[list[tuple[int, str]], int, bool]:
        """The studies that became stable after change ``since``, read one page: ([(sequence number, Orthanc's
        study id)], the page's last sequence number, whether the feed is read to its end)."""
        answer = self._get("the change feed", "/changes", since=since, limit=PAGE)
        if not isinstance(answer, dict):
            raise PacsError(f"the change feed: {self.url}/changes did not answer a change list")
        found = [
            (int(c["Seq"]), str(c["ID"])) for c in answer.get("Changes", []) if c.get("ChangeType") == "StableStudy"
        ]
        return found, int(answer.get("Last", since)), bool(answer.get("Done", True))

    def study_uid(self, orthanc_id: str) -> str | None:
        """The StudyInstanceUID of Orthanc's study ``orthanc_id``; None when it is gone (deleted since)."""
        study = self._get("a study's lookup", f"/studies/{orthanc_id}")
        if not isinstance(study, dict):
            return None
        return study.get("MainDicomTags", {}).get("StudyInstanceUID") or None


def orthanc_rest_url(dicomweb_url: str) -> str | None:
    """Orthanc's REST root under which its DICOMweb plugin answers (``.../dicom-web`` removed), else None."""
    url = dicomweb_url.rstrip("/")
    return url[: -len("/dicom-web")] if url.endswith("/dicom-web") else None


@dataclass(frozen=True)
class WatchConfig:
    state: Path  # the state folder (watch.json, studies.csv, audit.jsonl), made private (0700)
    poll_seconds: float = 10.0  # the wait between two readings of the feed, and the back-off's first step
    health_port: int | None = None  # GET 127.0.0.1:PORT/health answers the state (0: any free port; None: off)
    backlog: bool = False  # at the first start, also run the studies the feed already holds (default: new ones)
    store: bool = True  # store the results in the study (False: predict only, as `pacs run --no-store`)
    method: str | None = None  # the overlay's saliency method (None: the run's)
    check: bool = True  # refuse studies unlike the training images (False: answer them too)
    fhir: FhirOptions | None = None  # also POST each study's FHIR results (as `pacs run --fhir-url`)


class _State:
    """``STATE/watch.json``: the last change handled and the studies to try again ({StudyInstanceUID: failures};
    the folder and file are private: the UIDs are the patient's)."""

    def __init__(self, folder: Path):
        self.path = folder / "watch.json"
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        try:
            self.last_change = int(data.get("last_change", -1))
            self.pending = {str(k): int(v) for k, v in data.get("pending", {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(self.path, "the watch state is damaged", "the file watch writes") from None

    @property
    def new(self) -> bool:
        return self.last_change < 0

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"last_change": self.last_change, "pending": self.pending}, f)
        os.replace(tmp, self.path)


class Watcher:
    """Follows ``changes`` and runs each new stable study of ``pacs`` once with ``predictor``; see the module."""

    def __init__(self, predictor: Predictor, pacs: Pacs, changes: OrthancChanges, config: WatchConfig):
        self.predictor, self.pacs, self.changes, self.config = predictor, pacs, changes, config
        self.state = _State(config.state)
        self.csv = config.state / "studies.csv"
        self.done = finished_keys(self.csv)
        self.due: dict[str, float] = dict.fromkeys(self.state.pending, 0.0)  # uid -> when (monotonic) to retry
        self.checked = False  # whether the feed's URL answered as Orthanc
        self.health: dict = {
            "status": "starting",
            "last_change": max(self.state.last_change, 0),
            "studies_done": 0,
            "studies_failed": 0,
            "studies_to_retry": len(self.state.pending),
            "last_error": None,
            "last_error_time": None,
        }

    def run(self, stop: threading.Event) -> None:
        """Follow the feed until ``stop`` is set; temporary failures are waited out with a back-off."""
        failures = 0
        while not stop.is_set():
            try:
                if not self.checked:  # (here, not before the loop: a PACS down at the start is waited for)
                    self.changes.check()
                    self.checked = True
                if self.state.new:
                    self.state.last_change = 0 if self.config.backlog else self.changes.last()
                    self.state.save()
                self._follow(stop)
                self._retry_due(stop)
                failures, wait = 0, self.config.poll_seconds
                self.health["status"] = "ok"
            except PacsError as e:
                if not e.transient:
                    raise
                failures += 1
                wait = min(self.config.poll_seconds * 2**failures, MAX_BACKOFF)
                self._failed(e)
                log.warning("%s; trying again in %.0f s", e, wait)
            stop.wait(wait)

    def _failed(self, e: Exception) -> None:
        self.health.update(status="degraded", last_error=type(e).__name__, last_error_time=_now())

    def _follow(self, stop: threading.Event) -> None:
        """Run the studies that became stable since the last change handled, to the feed's end."""
        while not stop.is_set():
            found, last, done = self.changes.stable_studies(self.state.last_change)
            for seq, orthanc_id in found:
                if stop.is_set():
                    return
                uid = self.changes.study_uid(orthanc_id)
                trouble = self._run(uid) if uid is not None else None
                self._handled(seq)  # (a study that failed for now is in the state's list to try again)
                if trouble is not None:  # the PACS is likely in trouble: back off
                    raise PacsError(trouble, transient=True)
            self._handled(last)
            if done:
                return

    def _handled(self, seq: int) -> None:
        if seq > self.state.last_change:
            self.state.last_change = seq
            self.state.save()
            self.health["last_change"] = seq

    def _retry_due(self, stop: threading.Event) -> None:
        now = time.monotonic()
        for uid in [uid for uid, when in self.due.items() if when <= now]:
            if stop.is_set():
                return
            trouble = self._run(uid)
            if trouble is not None:
                raise PacsError(trouble, transient=True)

    def _run(self, uid: str) -> str | None:
        """Run the study ``uid`` unless done. A temporary failure schedules it again (with a back-off) and
        its reason is returned; else None."""
        key = study_key(uid)
        if key in self.done:  # answered before (its results' arrival made it stable again), or in the CSV
            self._forget(uid)
            return None
        t0 = time.perf_counter()
        c = self.config
        outcomes = run_studies(
            self.predictor,
            self.pacs,
            [uid],
            store=c.store,
            method=c.method,
            check=c.check,
            csv_path=self.csv,
            fhir=c.fhir,
        )
        seconds = time.perf_counter() - t0
        if not outcomes:  # already final in the CSV (written by another run)
            self.done.add(key)
            self._forget(uid)
            return None
        outcome = outcomes[0]
        self._audit(key, outcome.status, seconds)
        if outcome.status == RETRY:
            failures = self.state.pending.get(uid, 0) + 1
            self.state.pending[uid] = failures
            self.due[uid] = time.monotonic() + min(c.poll_seconds * 2**failures, MAX_BACKOFF)
            self.state.save()
            self.health["studies_to_retry"] = len(self.due)
            return outcome.reason
        self.done.add(key)
        self.health["studies_failed" if outcome.status == "error" else "studies_done"] += 1
        self._forget(uid)
        return None

    def _forget(self, uid: str) -> None:
        if self.state.pending.pop(uid, None) is not None:
            self.state.save()
        self.due.pop(uid, None)
        self.health["studies_to_retry"] = len(self.due)

    def _audit(self, key: str, status: str, seconds: float) -> None:
        line = json.dumps({"time": _now(), "study": key, "status": status, "seconds": round(seconds, 2)})
        print(line, flush=True)
        fd = os.open(self.config.state / "audit.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class HealthServer:
    """``GET /health`` on 127.0.0.1:``port`` (0: a free port, see :attr:`port`): ``health()`` as JSON, HTTP 200
    when its status is ``ok``, else 503. Served from a background thread until :meth:`close`."""

    def __init__(self, port: int, health):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # (no access log)
                pass

            def do_GET(self):
                if self.path.split("?")[0] != "/health":
                    self.send_error(404)
                    return
                state = dict(health())
                body = json.dumps(state).encode()
                self.send_response(200 if state.get("status") == "ok" else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as e:
            raise MedtlError(f"the health endpoint cannot listen on 127.0.0.1:{port} ({e.strerror})") from None
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="medtl-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One watcher per state folder (two would run the same studies)."""
    fd = os.open(folder / "watch.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MedtlError(f"another `medtl pacs watch` uses the state folder {folder}") from None
        yield
    finally:
        os.close(fd)


def _stopped_by_signals(stop: threading.Event) -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGINT set ``stop`` (between studies; during one, run_studies' own handler ends it)."""

    def handler(signum, frame):
        log.warning("stopping (signal %d)", signum)
        stop.set()

    return handling_signals(handler, (signal.SIGTERM, signal.SIGINT))


def watch(
    predictor: Predictor, pacs: Pacs, changes: OrthancChanges, config: WatchConfig, stop: threading.Event | None = None
) -> int:
    """Run the watcher until SIGTERM/SIGINT (or ``stop``); 0. See the module for what it does."""
    config.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.state.chmod(0o700)
    stop = stop or threading.Event()
    with _locked(config.state), _stopped_by_signals(stop):
        watcher = Watcher(predictor, pacs, changes, config)
        health = HealthServer(config.health_port, lambda: watcher.health) if config.health_port is not None else None
        if health is not None:
            print(f"health: http://127.0.0.1:{health.port}/health", file=sys.stderr, flush=True)
        log.info("watching %s for new studies (state in %s)", changes.url, config.state)
        try:
            watcher.run(stop)
        finally:
            watcher.health["status"] = "stopping"
            if health is not None:
                health.close()
    log.info("stopped")
    return 0


__all__ = ["watch", "Watcher", "WatchConfig", "OrthancChanges", "HealthServer", "orthanc_rest_url", "MAX_BACKOFF"]
