"""Reading untrusted files in a bounded worker: one hostile file cannot take the server down.

:func:`read_image_bounded` parses the file in a child process (forked from a small fork server
that has only medtl's readers imported, no torch) with an address-space limit and a
wall-clock limit. The child sends back the :class:`~medtl.io.scan.Scan` or the typed error; a
child that runs past the time limit is killed, and one that dies (a crash in a native decoder,
or killed for memory) becomes a typed error too. The web UI and ``medtl predict`` read through it.
Anything the child writes to disk (unpacked zip members) goes to a private folder that the parent
removes after the read, however it ended.

Like every multiprocessing start method but fork, the fork server imports the main script once:
a script calling this needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import shutil
import tempfile
import threading
from pathlib import Path

from medtl.errors import CorruptImageError, InputTooLargeError, MedtlInputError
from medtl.io.guard import safe_message
from medtl.io.limits import ReadLimits, read_limits, set_read_limits
from medtl.io.scan import Scan

_lock = threading.Lock()
_context = None
_OVERHEAD = 1 << 30  # address space beyond the budget: libraries' mappings, decoder buffers


def _ctx():
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["medtl.io"])
            _context = ctx
        return _context


def vm_size() -> int:
    """This process's virtual memory size in bytes (0 where /proc is not available)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(conn, path: str, kwargs: dict, limits: ReadLimits, scratch: str, task: str = "read") -> None:
    # the child's log records (e.g. a zip member's name, which may hold a patient's name) go nowhere: without a
    # handler, Python's last resort would print them to the server's stderr
    logging.getLogger().addHandler(logging.NullHandler())
    tempfile.tempdir = scratch  # unpacked zip members go where the parent removes them, whatever happens here
    try:
        cap = vm_size() + 2 * limits.max_bytes + _OVERHEAD
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (OSError, ValueError):
        pass  # a platform without the limit still gets the budget checks and the time limit
    set_read_limits(limits)
    from medtl.io.info import describe_path
    from medtl.io.reader import read_image

    result: tuple[str, Scan | dict | MedtlInputError]  # ("scan", what was read) or ("error", the typed error)
    try:
        result = ("scan", read_image(path, **kwargs) if task == "read" else describe_path(path, **kwargs))
    except MedtlInputError as e:
        result = ("error", e.with_traceback(None))
    except MemoryError:
        result = ("error", InputTooLargeError(path, "reading it ran out of the memory allowed to one input"))
    except BaseException as e:
        result = ("error", CorruptImageError(path, f"file cannot be read ({safe_message(e)})"))
    try:
        conn.send(result)
    except MemoryError:
        conn.send(("error", InputTooLargeError(path, "the image read is too large to hand back")))
    conn.close()


def read_image_bounded(path: str | Path, limits: ReadLimits | None = None, **kwargs) -> Scan:
    """:func:`medtl.io.read_image` in a child process bounded in memory and time.

    ``limits`` default to :func:`medtl.io.limits.read_limits`; ``kwargs`` go to ``read_image``.
    Raises the same typed errors as ``read_image``, and :class:`InputTooLargeError` when the
    read runs past ``limits.timeout_s`` or the process dies for memory.
    """
    return _bounded(path, limits, kwargs, "read")


def describe_path_bounded(path: str | Path, limits: ReadLimits | None = None, **kwargs) -> dict:
    """:func:`medtl.io.describe_path` (the series a folder or zip holds, which one would be used) in
    the bounded worker, for untrusted uploads."""
    return _bounded(path, limits, kwargs, "describe")


def _bounded(path: str | Path, limits: ReadLimits | None, kwargs: dict, task: str):
    path = Path(path)
    limits = limits or read_limits()
    ctx = _ctx()
    scratch = tempfile.mkdtemp(prefix="medtl-read-")  # mode 0700; removed below, even if the child is killed
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, str(path), kwargs, limits, scratch, task), daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(limits.timeout_s):
            proc.kill()
            raise InputTooLargeError(
                path,
                f"reading it took longer than {limits.timeout_s:g} s; stopped",
                "a file that reads in time, or raise the time limit",
            )
        try:
            kind, value = receiver.recv()
        except (EOFError, OSError):
            proc.join(5)
            code = proc.exitcode
            raise CorruptImageError(
                path,
                "the reader process died while reading it"
                + (f" (signal {-code})" if code is not None and code < 0 else ""),
            ) from None
    finally:
        receiver.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        shutil.rmtree(scratch, ignore_errors=True)
    if kind == "error":
        raise value
    return value
