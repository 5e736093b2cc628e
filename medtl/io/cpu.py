"""A processor-time limit on one in-process read: :func:`cpu_limited`.

In the bounded worker the kernel stops a read at its limit (``RLIMIT_CPU``). A read in medtl's own process
(training, ``medtl deid``, a script) cannot be killed, so a profiling timer (``ITIMER_PROF``: processor time of
the process) raises an exception in the main thread once the limit has passed; it takes effect when Python runs
again (after a C decoder returns), and fires again each second if something swallowed it. Outside the main
thread (Python delivers signals there only) and where the timer does not exist, a read runs without it; its
header-based limits (frames, scans, extensions, sizes) still hold.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from medtl.errors import InputTooLargeError


class _Expired(BaseException):
    """Raised by the timer: a BaseException, so that no ``except Exception`` on the way swallows it."""


def _expired(signum, frame):
    signal.setitimer(signal.ITIMER_PROF, 1.0)  # again in a second, in case it is swallowed anyway
    raise _Expired


_active = False  # a read inside a read (a series' files) runs under the outer one's limit


@contextlib.contextmanager
def cpu_limited(path: str | Path | None, seconds: float):
    """Run the block with ``seconds`` of processor time at most; past it, :class:`InputTooLargeError` naming
    ``path``."""
    global _active
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or _active or not seconds > 0:
        yield
        return
    previous = signal.signal(signal.SIGPROF, _expired)
    _active = True
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    except _Expired:
        raise InputTooLargeError(
            path,
            f"reading it used more than {seconds:g} s of processor time; stopped",
            "a file that reads in time, or raise MEDTL_MAX_INPUT_CPU_S",
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        _active = False


__all__ = ["cpu_limited"]
