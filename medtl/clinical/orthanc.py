"""A PACS started by medtl: Orthanc with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``), with a
configuration medtl writes.

What it holds is identified patient data, so:

- **remote access is off**: Orthanc answers only requests from the machine itself (``RemoteAccessAllowed``
  false; Orthanc 1.10 has no option to listen on loopback only, so its port is open on every interface, and
  every request from another machine is refused), authentication is on, the DIMSE port is off;
- **at rest**: the storage folder is made private (0700) and Orthanc runs with umask 077, so its database,
  stored instances, temporary files (``TemporaryDirectory``, inside the storage) and log are 0700/0600;
- **supervised**: Orthanc dies with the process that started it (``PR_SET_PDEATHSIG`` on Linux: a
  ``kill -9``'d ``medtl pacs serve`` leaves no Orthanc answering), and :meth:`OrthancServer.wait` notices
  Orthanc stopping on its own.

With Debian's ``orthanc-webviewer`` installed, its plugin is loaded too: Orthanc Explorer
(:attr:`OrthancServer.explorer_url`) then shows an "Orthanc Web Viewer" button on each series, which opens
:meth:`OrthancServer.viewer_url` (the source images, and medtl's Secondary Capture in its own series); its image
cache is kept inside the private storage folder.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pydicom

from medtl.clinical.pacs import Credentials, Pacs
from medtl.errors import MedtlError

log = logging.getLogger("medtl.clinical.orthanc")
ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WEB_VIEWER_PLUGIN = "libOrthancWebViewer.so"  # Debian: orthanc-webviewer


class OrthancStoppedError(MedtlError):
    """Orthanc stopped on its own (crashed, or was killed) while medtl was serving it."""


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


def find_web_viewer() -> str | None:
    """Orthanc's web viewer plugin (Debian: ``orthanc-webviewer``) when installed, else None."""
    return next(
        (str(Path(d) / WEB_VIEWER_PLUGIN) for d in ORTHANC_PLUGIN_DIRS if (Path(d) / WEB_VIEWER_PLUGIN).is_file()), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup() -> None:  # pragma: no cover -- runs in the child, between fork and exec
    """Orthanc's start: private files (umask 077), and, on Linux, SIGTERM when its parent dies."""
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _private(path: Path) -> None:
    """``path`` and what is under it: readable by its owner only (0700 folders, 0600 files)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), 0o600)


class OrthancServer:
    """Orthanc with its DICOMweb plugin, answering loopback only (remote access off), authentication on, no
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
        self.storage = Path(self._own.name) if self._own is not None else Path(str(storage))
        self.port = port or _free_port()
        self.credentials = credentials or Credentials("medtl", secrets.token_urlsafe(18))
        self.process: subprocess.Popen | None = None
        self.web_viewer = find_web_viewer()  # its plugin, when installed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def explorer_url(self) -> str:
        """Orthanc Explorer, Orthanc's built-in web page (studies, series, previews; the web viewer's button)."""
        return f"http://127.0.0.1:{self.port}/app/explorer.html"

    def viewer_url(self, series_id: str) -> str:
        """The web viewer on a series (``series_id``: Orthanc's identifier of the series); needs the plugin."""
        if self.web_viewer is None:
            raise MedtlError("Orthanc's web viewer is not installed (Debian: apt-get install orthanc-webviewer)")
        return f"http://127.0.0.1:{self.port}/web-viewer/app/viewer.html?series={series_id}"

    def config(self) -> dict:
        config: dict[str, object] = {
            "Name": "medtl",
            "StorageDirectory": str(self.storage / "db"),
            "IndexDirectory": str(self.storage / "db"),
            "TemporaryDirectory": str(self.storage / "tmp"),
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
        if self.web_viewer is not None:  # its cache of decoded images: in the private storage
            config["Plugins"] = [self.plugin, self.web_viewer]
            config["WebViewer"] = {"CachePath": str(self.storage / "webviewer-cache")}
        return config

    def start(self, timeout: float = 60) -> OrthancServer:
        import requests

        _private(self.storage)
        (self.storage / "tmp").mkdir(exist_ok=True, mode=0o700)
        config = self.storage / "orthanc.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(), f, indent=1)
        fd = os.open(self.storage / "orthanc.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(
            [self.program, str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C: stop() stops it, after the rest
            preexec_fn=_child_setup,  # umask and the parent-death signal, set before exec
        )
        deadline = time.monotonic() + timeout
        auth = (self.credentials.user, self.credentials.password)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MedtlError(f"Orthanc stopped at start (exit {self.process.returncode}): {self._tail()}")
            try:
                if requests.get(f"{self.url}/studies", auth=auth, timeout=2).status_code == 200:
                    log.info("Orthanc %s on %s (storage %s)", self.program, self.url, self.storage)
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise MedtlError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def _tail(self) -> str:
        return (self.storage / "orthanc.log").read_text(errors="replace")[-600:]

    def wait(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM), poll: float = 1.0) -> int:
        """Serve until one of ``signals`` arrives (the signal's number is returned) or Orthanc stops on its own
        (:class:`OrthancStoppedError`, with the end of its log). Call from the main thread."""
        if self.process is None:
            raise MedtlError("Orthanc is not started")
        wanted = set(signals)
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            while True:
                got = signal.sigtimedwait(wanted, poll)
                if got is not None:
                    return got.si_signo
                if self.process.poll() is not None:
                    raise OrthancStoppedError(
                        f"Orthanc stopped on its own (exit {self.process.returncode}); its log ends: {self._tail()}"
                    )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)

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


def load_or_create_credentials(path: Path, renew: bool = False) -> tuple[Credentials, bool]:
    """The credentials kept in ``path`` (the server's own file), or new ones (a random password for user
    ``medtl``) written there, readable by its owner only, when there is none or ``renew``; (credentials,
    whether they are new). Restarting a server keeps its password unless asked to change it."""
    kept = Credentials.load(path) if path.is_file() and not renew else None
    if kept is not None:
        return kept, False
    credentials = Credentials("medtl", secrets.token_urlsafe(18))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": credentials.user, "password": credentials.password}, f)
    os.chmod(path, 0o600)
    return credentials, True


__all__ = ["OrthancServer", "OrthancStoppedError", "find_orthanc", "find_web_viewer", "load_or_create_credentials"]
