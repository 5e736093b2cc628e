"""Signal handlers for the clinical services while they run (``pacs run``, ``pacs listen``, ``pacs watch``): set
for a block, restored after it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


@contextlib.contextmanager
def handling_signals(
    handler: Callable[[int, FrameType | None], object], signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
) -> Iterator[None]:
    """``handler`` for ``signals`` while the block runs, the previous handlers after it. In a thread other than
    the main one (which alone can set handlers) nothing is set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["handling_signals"]
