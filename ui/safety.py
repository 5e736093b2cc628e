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
import errno
import logging
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

from medtl_ui.login import ClientAddressMiddleware, LoginThrottle, client_middleware, current_client

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


@dataclass(frozen=True)
class StoredFile:
    """An upload after :func:`store_upload`: ``path`` on disk (random name) and ``display``, the only
    name the page may show: its place in the upload and its extension (``"file 1 (.dcm)"``), never its name."""

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
    # never the file's own name: a lower-case "smith_john.png" cannot be told from "chest.png" (the case key and
    # the file's place in the upload tell files apart)
    return StoredFile(dest, f"file {i}" + (f" ({ext})" if ext else ""))


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
