"""The page's audit trail: one JSON line per action on a case (time, case key, user, model, action, result), in
``audit.log`` of the run that answered or of a configured folder (``medtl serve --audit-dir``). No identifier is
written: a case is its key (a hash of the uploaded bytes), a result the answer's class or the kind of refusal."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import threading
from pathlib import Path

log = logging.getLogger("medtl.ui")

AUDIT_FILE = "audit.log"
#: the signed-in user of the request being served (``medtl serve --auth``), "-" without sign-in
USER: contextvars.ContextVar[str] = contextvars.ContextVar("medtl_user", default="-")


class AuditLog:
    """Appends audit lines to ``folder/audit.log`` (``folder`` None: each run's own folder)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._failed: set[Path] = set()

    def path(self, run_dir: Path) -> Path:
        return (self.folder or Path(run_dir)) / AUDIT_FILE

    def write(self, run_dir: Path, action: str, case_key: str = "", result: str = "") -> None:
        """One line: UTC time, case key, user, model (the run's folder name), action and result."""
        line = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "case": case_key or "-",
            "user": USER.get(),
            "model": Path(run_dir).name,
            "action": action,
            "result": result,
        }
        path = self.path(run_dir)
        try:
            with self._lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:  # a read-only run folder: said once, the page goes on
            if path not in self._failed:
                self._failed.add(path)
                log.warning("audit log %s cannot be written (%s): pass --audit-dir", path, type(e).__name__)


def outcome(case, message: str) -> str:
    """What a case's audit line says of its result: the answer, or the kind of refusal (never its words, which
    may quote a file)."""
    if case is None:
        if "not fit to show answers" in message:
            return "no answer: model below the quality floor"
        return "refused: cannot use the upload"
    if case.refused:
        return "refused: unlike the training images"
    return f"answered: {case.prediction.get('label')}"
