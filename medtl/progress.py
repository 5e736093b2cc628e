"""Progress of a long job made of named phases, with the time spent and an estimate of the time left.

:class:`Phases` logs one line as each phase starts: ``[3/7] saliency sanity: occlusion (41 s so far, about
25 s left)``. The estimate weighs each phase by its expected relative cost and scales those weights by the
time the finished phases actually took, so it improves as the job goes on; before any phase has finished it
says nothing. Used by ``medtl evaluate``; kept free of torch so any layer may use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence


def _seconds(s: float) -> str:
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
        when = f"{_seconds(now - self.t0)} so far" + (f", about {_seconds(left)} left" if left is not None else "")
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
        self.log.info("%s done in %s", self.what or "job", _seconds(now - self.t0))
        return now - self.t0


__all__ = ["Phases"]
