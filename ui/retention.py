"""Uploads kept no longer than their case: the private folder of a case's files is deleted when the case ends
(a new upload, the upload box cleared, the session closed) and, whatever happens, once older than the retention
time (``medtl serve --retention-minutes``, default 60), by a sweeper thread of the server."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

RETENTION_S = 3600.0  # an upload older than this is deleted, whether or not its case is still open


def remove_upload(path: Path | None, workdir: Path) -> None:
    """Delete the private folder an upload was stored in (:func:`store_upload`): its case has ended. Only a
    folder ``upload-*`` directly inside ``workdir`` is removed."""
    if path is None:
        return
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if folder.parent == Path(workdir) and folder.name.startswith("upload-"):
        shutil.rmtree(folder, ignore_errors=True)


def sweep_uploads(workdir: Path, retention_s: float = RETENTION_S, now: float | None = None) -> int:
    """Delete the upload folders in ``workdir`` older than ``retention_s`` seconds; how many were deleted."""
    now = time.time() if now is None else now
    removed = 0
    for folder in Path(workdir).glob("upload-*"):
        try:
            old = now - folder.stat().st_mtime > retention_s
        except OSError:
            continue
        if old:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def start_sweeper(workdir: Path, retention_s: float = RETENTION_S, every_s: float = 60.0) -> threading.Event:
    """Sweep ``workdir``'s old uploads every ``every_s`` seconds in a daemon thread; set the event to stop it."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            sweep_uploads(workdir, retention_s)

    threading.Thread(target=loop, name="medtl-upload-sweeper", daemon=True).start()
    return stop
