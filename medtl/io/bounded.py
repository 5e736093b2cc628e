"""Reading untrusted files in a bounded worker: one hostile file cannot take the server down.

:func:`read_image_bounded` parses the file in a child process (forked from a small fork server
that has only medtl's readers imported, no torch) with a memory cap, a processor-time limit and a
wall-clock limit. The memory cap is an address-space limit of the child's size before the read plus
the budget (``ReadLimits.max_bytes``): its resident memory cannot grow by more than the budget,
whatever a decoder allocates, and a read that would is refused with a typed error. The child sends
back the :class:`~medtl.io.scan.Scan` or the typed error; a child that runs past a time limit is
killed, and one that dies (a crash in a native decoder, or killed for memory) becomes a typed
error too. The web UI, ``medtl predict``, ``explain``, ``info``, ``evaluate --foreign`` and the PACS
commands read through it.
Anything the child writes to disk (unpacked zip members) goes to a private folder that the parent
removes after the read, however it ended.

Like every multiprocessing start method but fork, the fork server imports the main script once:
a script calling this needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import resource
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from medtl.errors import CorruptImageError, InputTooLargeError, MedtlInputError
from medtl.io.guard import safe_message
from medtl.io.limits import ReadLimits, read_limits, set_read_limits, size_text
from medtl.io.scan import Scan

_lock = threading.Lock()
_context = None
_OVER_BUDGET = "reading it needed more than the memory budget of {} for one input; stopped"


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
    return _status_kib("VmSize:") * 1024


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cap_this_process(limits: ReadLimits) -> None:
    """The child's limits: address space of its size now plus the budget, processor time, no core file."""
    for which, value in (
        (resource.RLIMIT_AS, vm_size() + limits.max_bytes),
        (resource.RLIMIT_CPU, max(1, math.ceil(limits.cpu_s)) + 2),  # (read_image's own timer first)
        (resource.RLIMIT_CORE, 0),
    ):
        try:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, hard))
        except (OSError, ValueError):
            pass  # a platform without the limit still gets the budget checks and the wall-clock limit


def _child(conn, path: str, kwargs: dict, limits: ReadLimits, scratch: str, task: str = "read") -> None:
    # the child's log records (e.g. a zip member's name, which may hold a patient's name) go nowhere: without a
    # handler, Python's last resort would print them to the server's stderr
    logging.getLogger().addHandler(logging.NullHandler())
    tempfile.tempdir = scratch  # unpacked zip members go where the parent removes them, whatever happens here
    baseline = _status_kib("VmRSS:")
    cap_this_process(limits)
    set_read_limits(limits)
    from medtl.io.info import describe_path
    from medtl.io.reader import read_image

    result: tuple[str, Scan | dict | MedtlInputError, dict]  # ("scan" or "error", what was read or why, memory)
    try:
        value = read_image(path, **kwargs) if task == "read" else describe_path(path, **kwargs)
        result = ("scan", value, {})
    except MedtlInputError as e:
        result = ("error", e.with_traceback(None), {})
    except MemoryError:
        result = ("error", InputTooLargeError(path, _OVER_BUDGET.format(size_text(limits.max_bytes))), {})
    except BaseException as e:
        result = ("error", CorruptImageError(path, f"file cannot be read ({safe_message(e)})"), {})
    result[2].update(baseline_kib=baseline, peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    try:
        _send(conn, result)
    except MemoryError:
        _send(conn, ("error", InputTooLargeError(path, "the image read is too large to hand back"), result[2]))
    conn.close()


def _send(conn, value) -> None:
    """Pickle ``value`` with its arrays out of band: each array's memory goes down the pipe as it is, never
    copied into one pickle (a copy that would double a large image's memory)."""
    buffers: list[memoryview] = []
    head = pickle.dumps(value, protocol=5, buffer_callback=lambda b: buffers.append(b.raw()))
    conn.send((head, [b.nbytes for b in buffers]))
    for b in buffers:
        conn.send_bytes(b)


def _receive(conn):
    head, sizes = conn.recv()
    buffers = [bytearray(n) for n in sizes]  # writable, as the child's arrays were
    for b in buffers:
        conn.recv_bytes_into(b)
    return pickle.loads(head, buffers=buffers)


def read_image_bounded(
    path: str | Path, limits: ReadLimits | None = None, memory: dict | None = None, **kwargs
) -> Scan:
    """:func:`medtl.io.read_image` in a child process bounded in memory and time.

    ``limits`` default to :func:`medtl.io.limits.read_limits`; ``kwargs`` go to ``read_image``.
    ``memory``, a dict, receives the child's resident memory before the read and at its peak
    (``baseline_kib``, ``peak_kib``). Raises the same typed errors as ``read_image``, and
    :class:`InputTooLargeError` when the read needs more memory than ``limits.max_bytes`` or runs
    past ``limits.cpu_s`` of processor time or ``limits.timeout_s`` of wall-clock time.
    """
    return _bounded(path, limits, kwargs, "read", memory)


def describe_path_bounded(path: str | Path, limits: ReadLimits | None = None, **kwargs) -> dict:
    """:func:`medtl.io.describe_path` (the series a folder or zip holds, which one would be used) in
    the bounded worker, for untrusted uploads and ``medtl info``."""
    return _bounded(path, limits, kwargs, "describe")


def _bounded(path: str | Path, limits: ReadLimits | None, kwargs: dict, task: str, memory: dict | None = None):
    path = Path(path)
    limits = limits or read_limits()
    ctx = _ctx()
    scratch = tempfile.mkdtemp(prefix="medtl-read-")  # mode 0700; removed below, even if the child is killed
    try:
        kind, value, used = _run_child(ctx, path, kwargs, limits, scratch, task)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if memory is not None:
        memory.update(used)
    if kind == "error":
        raise value
    return value


def _run_child(ctx, path: Path, kwargs: dict, limits: ReadLimits, scratch: str, task: str):
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, str(path), kwargs, limits, scratch, task), daemon=True)
    try:
        proc.start()
        sender.close()
        if not receiver.poll(limits.timeout_s):
            proc.kill()
            raise InputTooLargeError(
                path,
                f"reading it took longer than {limits.timeout_s:g} s; stopped",
                "a file that reads in time, or raise the time limit",
            )
        try:
            return _receive(receiver)
        except (EOFError, OSError):
            proc.join(5)
            raise _died(path, proc.exitcode, limits) from None
    finally:
        receiver.close()
        if proc.pid is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _died(path: Path, code: int | None, limits: ReadLimits) -> MedtlInputError:
    """The typed error of a child that died without an answer."""
    if code == -signal.SIGXCPU:  # the kernel's signal at the processor-time limit
        return InputTooLargeError(
            path,
            f"reading it used more than {limits.cpu_s:g} s of processor time; stopped",
            "a file that reads in time, or raise MEDTL_MAX_INPUT_CPU_S",
        )
    return CorruptImageError(
        path,
        "the reader process died while reading it" + (f" (signal {-code})" if code is not None and code < 0 else ""),
    )
