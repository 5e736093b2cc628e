"""Following a long job: its phases and counted steps with the time left, and its log file.

:class:`Phases` logs one line as each phase starts: ``[3/7] saliency sanity: occlusion (41 s so far, about
25 s left)``. The estimate weighs each phase by its expected relative cost and scales those weights by the
time the finished phases actually took, so it improves as the job goes on; before any phase has finished it
says nothing. :class:`Steps` follows a counted loop within a phase (``features: 120/400 inputs (12 s, about
28 s left)``), a line every ``every`` seconds at most. :func:`log_to_file` copies a job's log lines, timestamped
and with debug detail, to a file (``RUN/train.log``) and keeps third-party warnings out of the terminal (in the
file) unless the terminal shows debug lines (``-v``). Used by ``medtl train`` and ``medtl evaluate``; kept free
of torch so any layer may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"  # train.log's lines
_PACKAGE = os.path.dirname(os.path.abspath(__file__))  # medtl's own files: its warnings are the user's to see


def format_seconds(s: float) -> str:
    """A duration in words: ``41 s``, ``2.5 min``, ``1.2 h``."""
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Phases:
    """``phases``: (name, expected relative cost) in the order they run; :meth:`start` each by name (a phase
    that turns out not to run is skipped with :meth:`skip`). ``clock`` is injectable for tests."""

    def __init__(
        self,
        phases: Sequence[tuple[str, float]],
        log: logging.Logger,
        what: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.names = [n for n, _ in phases]
        self.weights = {n: float(w) for n, w in phases}
        self.log, self.what, self.clock = log, what, clock
        self.t0 = clock()
        self.current: str | None = None
        self.started = 0.0
        self.done: dict[str, float] = {}  # phase -> seconds it took

    def _close(self, now: float) -> None:
        if self.current is not None:
            self.done[self.current] = now - self.started
            self.current = None

    def remaining(self) -> float | None:
        """Estimated seconds left after the phases finished so far (None before one has finished)."""
        spent = sum(self.done.values())
        weight_done = sum(self.weights[n] for n in self.done)
        if not self.done or weight_done <= 0:
            return None
        left = [n for n in self.names if n not in self.done]
        return spent / weight_done * sum(self.weights[n] for n in left)

    def start(self, name: str, detail: str = "") -> None:
        """Close the running phase and start ``name`` (one of the phases given), logging where the job stands."""
        now = self.clock()
        self._close(now)
        self.current, self.started = name, now
        left = self.remaining()
        when = f"{format_seconds(now - self.t0)} so far" + (
            f", about {format_seconds(left)} left" if left is not None else ""
        )
        label = f"{name}: {detail}" if detail else name
        self.log.info(
            "%s[%d/%d] %s (%s)", f"{self.what} " if self.what else "", self.index(name), len(self.names), label, when
        )

    def index(self, name: str) -> int:
        return self.names.index(name) + 1

    def skip(self, name: str) -> None:
        """``name`` will not run: its cost leaves the estimate."""
        self._close(self.clock())
        self.weights[name] = 0.0
        self.done[name] = 0.0

    def finish(self) -> float:
        """Close the last phase; the job's total seconds (also logged)."""
        now = self.clock()
        self._close(now)
        self.log.info("%s done in %s", self.what or "job", format_seconds(now - self.t0))
        return now - self.t0


class Steps:
    """A counted loop's progress: :meth:`advance` after each step logs ``what: done/total unit (spent, about left)``
    when ``every`` seconds have passed since the last line (and at the end, unless the whole loop took less than
    ``every``: a quick loop logs nothing), the estimate from the mean step
    time so far. ``clock`` is injectable for tests."""

    def __init__(
        self,
        what: str,
        total: int,
        log: logging.Logger,
        unit: str = "",
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.log, self.unit, self.every, self.clock = what, total, log, unit, every, clock
        self.done = 0
        self.t0 = self.last = clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every and self.done < self.total:
            return
        if self.done >= self.total and self.last == self.t0 and now - self.t0 < self.every:
            return  # a loop done within one interval needs no progress line
        self.last = now
        spent = now - self.t0
        left = spent / self.done * (self.total - self.done) if self.done else None
        when = format_seconds(spent) + (
            f", about {format_seconds(left)} left" if left and self.done < self.total else ""
        )
        unit = f" {self.unit}" if self.unit else ""
        self.log.info("%s: %d/%d%s (%s)", self.what, self.done, self.total, unit, when)

    def wrap(self, items, size: Callable[[object], int] = lambda item: 1) -> Iterator:
        """``items``, advancing by ``size(item)`` after each."""
        for item in items:
            yield item
            self.advance(size(item))


class _KeepWarningsOut(logging.Filter):
    """Drops warnings raised outside medtl's own files (captured as ``py.warnings`` records) from a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "py.warnings" or record.getMessage().startswith(_PACKAGE)


@contextlib.contextmanager
def log_to_file(path: str | Path, loggers: Sequence[str] = ("medtl",)) -> Iterator[Path]:
    """While the block runs: every record of ``loggers`` (at debug level), of third-party libraries (at their
    own level) and every warning go to ``path`` (appended, timestamped); the terminal's handlers show what they
    showed before at their level, less third-party warnings unless they show debug lines (``medtl -v``).
    Everything is put back as it was afterwards."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    terminal_level = root.getEffectiveLevel()
    keep_out = _KeepWarningsOut()
    shown = [h for h in root.handlers if h.level == logging.NOTSET]  # (they followed the root's level)
    for h in shown:
        h.setLevel(terminal_level)  # so the debug records sent to the file stay out of them
    if terminal_level > logging.DEBUG:
        for h in root.handlers:
            h.addFilter(keep_out)
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.DEBUG)
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once per place, into the file
            yield Path(path)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for h in root.handlers:
            h.removeFilter(keep_out)
        for h in shown:
            h.setLevel(logging.NOTSET)


__all__ = ["Phases", "Steps", "log_to_file", "format_seconds", "FILE_FORMAT"]
