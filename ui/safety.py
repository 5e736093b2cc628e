"""Safety helpers for the web UI: anonymous upload storage, upload-folder cleanup on signals, and
login throttling.

- :func:`store_upload` moves each uploaded file under a random name into a private folder, so the
  original file name (which may carry a patient name or MRN) no longer exists on disk, in a URL or on
  the page; :func:`looks_identifying` decides whether a name may be shown.
- :func:`install_cleanup` removes the private upload folder on normal exit *and* on SIGTERM, SIGINT
  and SIGHUP (``atexit`` alone does not run when the process is killed by a signal).
- :class:`LoginThrottle` is a callable for ``demo.launch(auth=...)`` that locks logins with an
  exponentially growing delay after repeated failures.

Gradio calls an ``auth`` callable as ``auth(username, password)`` only: it never sees the request. To
throttle per client, pass ``app_kwargs={"middleware": client_middleware()}`` to ``launch()``: that
ASGI middleware records each request's client address in a context variable that
:class:`LoginThrottle` reads. Without it the throttle keys on the user name instead. A global
backstop covers clients that change address (or forge ``X-Forwarded-For``, which uvicorn trusts
from 127.0.0.1).
"""

from __future__ import annotations

import atexit
import contextvars
import errno
import hmac
import logging
import math
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("medtl.ui.safety")

__all__ = [
    "SAFE_EXTENSIONS",
    "StoredFile",
    "safe_extension",
    "store_upload",
    "looks_identifying",
    "install_cleanup",
    "LoginThrottle",
    "client_middleware",
    "ClientAddressMiddleware",
    "current_client",
]

# -- uploads ---------------------------------------------------------------------------------------

#: Extensions a stored upload may keep (checked longest first, lower-cased); anything else gets none.
#: medtl's reader recognises files by content, so e.g. a .tif or .ima stored without extension still reads.
SAFE_EXTENSIONS = (".nii.gz", ".dcm", ".nii", ".png", ".jpg", ".jpeg", ".zip", ".npz")

# Gradio stores an upload by its content's hash: two sessions uploading the same bytes get the same path,
# and the first store moves it away. Where each moved path went (kept until the process ends).
_MOVED: dict[str, Path] = {}
UPLOAD_WAIT_S = 2.0  # how long a stored upload may still be on its way into Gradio's folder
_MOVES_LOCK = threading.Lock()

_SHOWABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ ()+-]{0,79}")  # a name outside this is never shown


@dataclass(frozen=True)
class StoredFile:
    """An upload after :func:`store_upload`: ``path`` on disk (random name) and ``display``, the only
    name the page may show (the original name, or e.g. ``"file 1 (.dcm)"`` when it may identify)."""

    path: Path
    display: str


def safe_extension(name: str) -> str:
    """The lower-case extension of ``name`` if it is in :data:`SAFE_EXTENSIONS`, else ``""``."""
    lower = name.lower()
    return next((ext for ext in SAFE_EXTENSIONS if lower.endswith(ext)), "")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _move(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``; across filesystems copy, then unlink ``src``."""
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o600)
        src.unlink()


def store_upload(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str] | None] | None, workdir: Path
) -> list[StoredFile]:
    """Move uploaded files into a new private folder (mode 0700) under ``workdir``, each under a random
    name (``secrets.token_hex``) that keeps only a :data:`SAFE_EXTENSIONS` extension.

    ``paths`` is what ``gr.File(type="filepath")`` gives: one path, a list of paths, or None. A file
    inside ``workdir`` (Gradio's upload folder) is moved, so its original name no longer exists on disk
    (the folder Gradio made for it is left, empty: another session may be uploading the same bytes into
    it); a file outside ``workdir`` (e.g. a bundled example) is copied and left alone. Several files land
    in the same folder, so ``result[0].path.parent`` is a series folder. On error the new folder is removed
    and the error raised. Returns one :class:`StoredFile` per file, in order (``[]`` for no files).
    """
    sources = _upload_paths(paths)
    if not sources:
        return []
    workdir = Path(workdir)
    folder = workdir / f"upload-{secrets.token_hex(8)}"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)  # whatever the umask
    try:
        return [_store_one(i, src, workdir, folder) for i, src in enumerate(sources, start=1)]
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _upload_paths(paths) -> list[Path]:
    """The uploaded files' paths: one path, a list of paths (empty entries dropped), or None."""
    if paths is None:
        return []
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [Path(p) for p in items if p]


def _store_one(i: int, src: Path, workdir: Path, folder: Path) -> StoredFile:
    """Upload number ``i`` moved (from Gradio's folder ``workdir``) or copied (from elsewhere) into ``folder``."""
    if src.is_symlink():
        raise ValueError(f"upload {i} is not a regular file")
    name = src.name
    ext = safe_extension(name)
    dest = folder / f"{secrets.token_hex(16)}{ext}"
    if _inside(src, workdir):
        _take_gradio_upload(i, src, dest)
    else:
        if not src.is_file():
            raise ValueError(f"upload {i} is not a regular file")
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o600)
    showable = _SHOWABLE.fullmatch(name) is not None and not looks_identifying(name)
    return StoredFile(dest, name if showable else f"file {i}" + (f" ({ext})" if ext else ""))


def _take_gradio_upload(i: int, src: Path, dest: Path) -> None:
    """Move upload ``i`` out of Gradio's upload folder to ``dest`` (or copy it from where another session
    moved the same bytes)."""
    # Gradio answers an upload before its background task has moved the file into place: wait for it
    # (unless another session's store moved those same bytes already)
    deadline = time.monotonic() + UPLOAD_WAIT_S
    while not src.is_file() and str(src) not in _MOVED and time.monotonic() < deadline:
        time.sleep(0.02)
    with _MOVES_LOCK:  # (checked under the lock: another session may be moving the same file)
        earlier = _MOVED.get(str(src))
        if src.is_file():
            _move(src, dest)
            _MOVED[str(src)] = dest
        elif earlier is not None and earlier.is_file():
            # Gradio keeps uploads by content: another session uploaded the same bytes, and its store moved
            # them away first. Copy that session's stored file.
            shutil.copyfile(earlier, dest)
            os.chmod(dest, 0o600)
        else:
            raise ValueError(f"upload {i} is not a regular file")
    # Gradio's per-upload folder (named by a hash of the content) is left in place, empty: another session's
    # upload of the same bytes may be about to be moved into it by Gradio


# -- identifying names -----------------------------------------------------------------------------

# Words common in imaging file names: a capitalised word that is none of these may be a person's name.
_VOCABULARY = frozenset(
    """
    dcm dicom dicomdir ima nii gz nifti png jpg jpeg tif tiff bmp zip npz npy mha mhd nrrd raw img image images
    scan scans series study studies slice slices vol volume file files data sample samples example test case
    ct mr mri pet spect us cr dx xr xray ray mg mammo nm ot sc rf dr cxr cbct angio
    head neck brain skull chest thorax lung lungs heart cardiac abdomen abd pelvis spine cspine lspine tspine
    liver kidney knee hip hand wrist foot ankle shoulder elbow breast prostate sinus
    ax axial sag sagittal cor coronal ap pa lat lateral left right bilat oblique view
    t1 t2 flair dwi adc swi pd stir gre bold dti mprage contrast pre post arterial venous portal delayed
    im se sr me seg mask label labels roi pred preds overlay report thumb preview anon anonymised anonymized
    deid normal abnormal positive negative pneumonia covid tb fracture nodule tumor tumour lesion
    train val valid validation phantom demo copy final new old
""".split()
)  # a block of words reads better than a list

_CARE = re.compile(
    r"mrn|patient|pat|dob|ssn|nhs|nhi|accession|acc|birth|born|surname|forename|firstname|"
    r"lastname|fullname|name"
)
_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*"
_DATES = (
    re.compile(r"(?<!\d)\d{4}[-_. /]\d{1,2}[-_. /]\d{1,2}(?!\d)"),  # 1965-03-12
    re.compile(r"(?<!\d)\d{1,2}[-_. /]\d{1,2}[-_. /](?:\d{4}|\d{2})(?!\d)"),  # 12.03.1965, 03/12/65
    re.compile(r"(?<!\d)\d{1,2}[-_ ]?" + _MONTHS + r"[-_ ]?\d{2,4}(?!\d)"),  # 12mar1965, 12-March-65
    re.compile(_MONTHS + r"[-_ ]?\d{1,2}[-_, ]+\d{4}(?!\d)"),  # march_12_1965
)


def _words(name: str) -> list[str]:
    """Alphabetic runs of ``name`` (any script), with camelCase split: ``JohnDoe`` -> John, Doe."""
    words = []
    for run in re.findall(r"[^\W\d_]+", name):
        start = 0
        for i in range(1, len(run)):
            if run[i].isupper() and run[i - 1].islower():
                words.append(run[start:i])
                start = i
        words.append(run[start:])
    return words


def looks_identifying(name: str) -> bool:
    """True when the file name may carry a patient identifier, so it must not be shown.

    Hidden: a DICOM person-name caret ``^`` or an ``@``; a run of 5 or more digits (MRN, accession
    number, a date such as 19650312, a DICOM UID); a token such as ``mrn``, ``patient``, ``pat_``,
    ``dob``, ``ssn``, ``nhs``, ``accession``, ``name``; a date in a common format (1965-03-12,
    12.03.1965, 12mar1965); and any capitalised or upper-case word that is not common imaging vocabulary
    (``Doe_John``, ``DOE JOHN``, ``JohnDoe``, ``Smith``). Shown: names such as ``img_0003.dcm``,
    ``vol_001.nii.gz``, ``chest.png``, ``CT_HEAD.dcm``, ``series.zip``. It errs on the side of hiding;
    a lower-case name (``doe_john.dcm``) cannot be told from ordinary words and is not caught.
    """
    base = Path(name).name
    lower = base.lower()
    if "^" in base or "@" in base or re.search(r"\d{5,}", base):
        return True
    if "patient" in lower or re.search(r"(?<![a-z])(?:" + _CARE.pattern + r")(?![a-z])", lower):
        return True
    if any(p.search(lower) for p in _DATES):
        return True
    # a capitalised word that is no imaging term: maybe a person's name
    return any(word[0].isupper() and len(word) >= 2 and word.lower() not in _VOCABULARY for word in _words(base))


# -- cleanup on exit and on signals ----------------------------------------------------------------

_cleanup_lock = threading.Lock()
_atexit_folders: set[str] = set()
_signal_folders: set[str] = set()
_CLEANUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _chain(folder: Path, signum: int, previous: Any) -> Callable[[int, Any], Any]:
    def handler(sig: int, frame: Any) -> Any:
        _remove(folder)
        if callable(previous):
            return previous(sig, frame)
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        # SIG_DFL (or a handler not set from Python): die of the same signal, so the exit status says so
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
        os._exit(128 + sig)  # only reached if the default action did not end the process

    handler.__qualname__ = f"medtl_cleanup_{signal.Signals(signum).name}"
    return handler


def install_cleanup(workdir: Path) -> None:
    """Remove ``workdir`` (recursively) at normal exit and when the process gets SIGTERM, SIGINT or SIGHUP.

    Each signal handler removes the folder, then does what the previous handler would: calls it if it
    was a Python handler (SIGINT's usual one raises KeyboardInterrupt); for the default disposition,
    re-raises the signal with it, so the process still dies "killed by SIGTERM" (SIGINT: raises
    KeyboardInterrupt). A signal that was ignored (SIG_IGN, e.g. SIGHUP under ``nohup``) stays ignored.
    Signal handlers can only be set from the main thread: from another thread only the ``atexit``
    cleanup is registered and a warning logged. Calling it again for the same folder does nothing.
    """
    folder = Path(workdir).absolute()
    key = str(folder)
    main = threading.current_thread() is threading.main_thread()
    with _cleanup_lock:
        if key not in _atexit_folders:
            _atexit_folders.add(key)
            atexit.register(_remove, folder)
        if not main:
            if key not in _signal_folders:
                log.warning(
                    "upload folder cleanup on signals not installed (not the main thread); "
                    "it is removed at normal exit only"
                )
            return
        if key in _signal_folders:
            return
        _signal_folders.add(key)
        for signum in _CLEANUP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue
            signal.signal(signum, _chain(folder, signum, previous))


# -- login throttling ------------------------------------------------------------------------------

_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("medtl_ui_client", default=None)


def current_client() -> str | None:
    """The client address of the request being served, as recorded by :class:`ClientAddressMiddleware`
    (None outside a request or without the middleware)."""
    return _client.get()


class ClientAddressMiddleware:
    """Pure ASGI middleware: records ``scope["client"]`` host for the duration of each HTTP request, so
    that an ``auth`` callable, which Gradio calls without the request, can see who is logging in.

    The address is the one uvicorn reports: behind a reverse proxy on 127.0.0.1 it is the address in
    ``X-Forwarded-For`` (uvicorn trusts that header from 127.0.0.1), which a local client can forge;
    :class:`LoginThrottle`'s global backstop covers that.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _client.set(str(client[0]) if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _client.reset(token)


def client_middleware() -> list[Any]:
    """``[Middleware(ClientAddressMiddleware)]`` for ``demo.launch(app_kwargs={"middleware": ...})``."""
    from starlette.middleware import Middleware  # the web server's (with gradio): imported only to serve

    return [Middleware(ClientAddressMiddleware)]


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0
    seen: float = 0.0
    logged: bool = False


class LoginThrottle:
    """A Gradio ``auth`` callable for one account that slows down password guessing.

    ``throttle(username, password)`` is True only for the right user name and password (compared with
    :func:`hmac.compare_digest`). The first ``free_failures`` failures cost nothing; each further one
    locks logins for ``base_delay`` seconds, doubling each time up to ``max_delay`` (1, 2, 4, ... 60 s).
    During a lock every attempt is refused at once, without checking the password and without
    sleeping (the callable runs in the server's event loop). A success resets the count.

    Who is locked: the client address when :func:`client_middleware` is installed (see
    :func:`current_client`), otherwise the user name (every wrong user name shares one count, so
    changing it does not help). In both cases a global count, with ``global_free_failures`` free
    failures (None: no global count), locks everyone, so that an attacker changing address gains
    little. ``clock`` (monotonic seconds) is injectable for tests. Only "login refused (locked for N s)"
    is logged, never the user name or address.
    """

    def __init__(
        self,
        user: str,
        password: str,
        *,
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        global_free_failures: int | None = 10,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        if not user or not password:
            raise ValueError("user and password must not be empty")
        if free_failures < 0 or base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need free_failures >= 0 and 0 < base_delay <= max_delay")
        self._user = user.encode("utf-8")
        self._password = password.encode("utf-8")
        self.free_failures = free_failures
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.global_free_failures = global_free_failures
        self.clock = clock
        self.max_clients = max_clients
        self.checks = 0  #: how many attempts had their password actually compared
        self._records: dict[tuple[str, str], _Record] = {}
        self._global = _Record()
        self._lock = threading.Lock()

    # The key never holds a user name other than the configured one (memory stays bounded).
    def _key(self, username: str, client: str | None) -> tuple[str, str]:
        if client is not None:
            return ("client", client)
        known = hmac.compare_digest(username.encode("utf-8"), self._user)
        return ("user", "known" if known else "other")

    def _delay(self, failures: int, free: int) -> float:
        over = failures - free
        if over <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(over - 1, 64))

    def _records_for(self, key: tuple[str, str], now: float) -> list[tuple[_Record, int]]:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self.max_clients:
                self._prune(now)
            record = self._records[key] = _Record()
        record.seen = now
        pairs = [(record, self.free_failures)]
        if self.global_free_failures is not None:
            pairs.append((self._global, self.global_free_failures))
        return pairs

    def _prune(self, now: float) -> None:
        for k in [k for k, r in self._records.items() if r.locked_until <= now]:
            del self._records[k]
        while len(self._records) >= self.max_clients:  # all locked: drop the least recently seen
            del self._records[min(self._records, key=lambda k: self._records[k].seen)]

    def lock_remaining(self, username: str = "", client: str | None = None) -> float:
        """Seconds until ``username`` (or ``client``, if given) may try again (0.0 if not locked)."""
        with self._lock:
            now = self.clock()
            record = self._records.get(self._key(username, client))
            until = max(
                record.locked_until if record else 0.0,
                self._global.locked_until if self.global_free_failures is not None else 0.0,
            )
            return max(0.0, until - now)

    def __call__(self, username: str, password: str) -> bool:
        client = current_client()
        with self._lock:
            now = self.clock()
            pairs = self._records_for(self._key(username, client), now)
            until = max(r.locked_until for r, _ in pairs)
            if until > now:
                first = [r for r, _ in pairs if r.locked_until > now and not r.logged]
                for r in first:
                    r.logged = True
                if first:  # once per lock, not once per attempt
                    log.warning("login refused (locked for %d s)", math.ceil(until - now))
                return False
            self.checks += 1
            ok_user = hmac.compare_digest(username.encode("utf-8"), self._user)
            ok_password = hmac.compare_digest(password.encode("utf-8"), self._password)
            if ok_user and ok_password:
                for r, _ in pairs:
                    r.failures, r.locked_until, r.logged = 0, 0.0, False
                return True
            longest = 0.0
            for r, free in pairs:
                r.failures += 1
                delay = self._delay(r.failures, free)
                if delay:
                    r.locked_until, r.logged = max(r.locked_until, now + delay), True
                    longest = max(longest, delay)
            if longest:
                log.warning("login refused (locked for %d s)", math.ceil(longest))
            return False
