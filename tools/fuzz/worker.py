"""The worker: a warm server process that has imported the reader, and forks a fresh child per file.

    python -m tools.fuzz.worker CONFIG_JSON    # started by tools.fuzz.server.Server, from the repository root

The child reads with the budget as medtl's read limit and the bounded reader's caps (address space of its
size plus the budget, processor time); the server kills it after the job's timeout and classifies how it ended
(read, typed, other, timeout, killed). Jobs come as JSON lines on stdin, results go as JSON lines to stdout
(what readers print goes nowhere).
"""

import contextlib
import gc
import importlib
import json
import os
import resource
import select
import signal
import sys
import time
import traceback
from pathlib import Path

import medtl
from medtl.errors import MedtlInputError
from medtl.io.bounded import cap_this_process
from medtl.io.limits import read_limits, set_read_limits

ROOT = Path(__file__).resolve().parents[2]
MEDTL_DIR = Path(medtl.__file__).resolve().parent


def type_name(e: BaseException) -> str:
    """An exception's class name, with its module unless built in."""
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short_path(filename: str) -> str:
    p = Path(filename)
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        text = p.as_posix()
        return text.split("site-packages/", 1)[1] if "site-packages/" in text else text


def _where(frame: traceback.FrameSummary | None) -> str:
    return f"{_short_path(frame.filename)}:{frame.lineno}" if frame else ""


def locate(e: BaseException, medtl_dir: Path = MEDTL_DIR) -> tuple[str, str]:
    """(innermost file:line inside the medtl package, innermost file:line of all) of an exception."""
    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if Path(f.filename).resolve().is_relative_to(medtl_dir)]
    return _where(inside[-1] if inside else None), _where(frames[-1] if frames else None)


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _limit_memory(budget: int) -> None:
    """The budget as medtl's read limit, and the bounded reader's own caps: address space of this process's
    size plus the budget, processor time (the server's timeout stays the wall-clock limit)."""
    limits = read_limits().replace(max_bytes=budget)
    set_read_limits(limits)
    cap_this_process(limits)


def child_read(path: str, reader, budget: int) -> dict:
    """Runs in the forked child: limits, the read, and its outcome."""
    _limit_memory(budget)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result: dict = {}
    try:
        scan = reader(path)
        array = getattr(scan, "array", None)
        result = {
            "outcome": "read",
            "shape": list(getattr(array, "shape", ())),
            "dtype": str(getattr(array, "dtype", "")),
        }
    except MedtlInputError as e:
        cause = e.__cause__ or e.__context__
        result = {"outcome": "typed", "error": type(e).__name__, "message": first_line(e)}
        if cause is not None:
            result["cause"] = type_name(cause)
    except BaseException as e:  # an untyped error is what the fuzzer looks for
        location, where = locate(e)
        result = {
            "outcome": "other",
            "error": type_name(e),
            "message": first_line(e),
            "location": location,
            "where": where,
        }
    result["seconds"] = round(time.perf_counter() - t0, 4)
    result["peak_kib"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if children:
        result["children_peak_kib"] = children
    return result


def _run_child(r: int, w: int, path: str, reader, budget: int) -> None:
    """The forked child: its own process group, the read, its result written to ``w``; never returns."""
    try:
        os.close(r)
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        out = (json.dumps(child_read(path, reader, budget)) + "\n").encode()
        while out:
            out = out[os.write(w, out) :]
    finally:
        os._exit(0)


def _read_line(r: int, deadline: float) -> tuple[bytes, bool]:
    """What the child wrote to ``r`` up to its first newline, and whether the deadline passed first."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, True
        if select.select([r], [], [], left)[0]:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            buf += chunk
    return buf, False


def fork_read(path: str, timeout: float, reader, budget: int, state: dict) -> dict:
    """Read ``path`` in a forked child with a wall-clock limit; classify how it ended."""
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _run_child(r, w, path, reader, budget)
    state["child"] = pid
    os.close(w)
    buf, timed_out = _read_line(r, t0 + timeout)
    os.close(r)
    if timed_out:
        kill_group(pid)
    status = _reap(pid, 5.0)
    kill_group(pid)  # anything the reader started
    state["child"] = None
    seconds = round(time.monotonic() - t0, 4)
    if timed_out:
        return {
            "outcome": "timeout",
            "error": "Timeout",
            "message": f"no result after {timeout:g} s",
            "seconds": seconds,
        }
    if buf.endswith(b"\n"):
        return json.loads(buf)
    if os.WIFSIGNALED(status):
        how = signal.Signals(os.WTERMSIG(status)).name
    else:
        how = f"exit status {os.WEXITSTATUS(status)}"
    return {"outcome": "killed", "error": how, "message": f"child died ({how}) without a result", "seconds": seconds}


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reap(pid: int, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            kill_group(pid)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.005)


def resolve(spec: str):
    """The object a ``module:name`` spec names."""
    module, _, name = spec.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def serve(config: dict) -> None:
    """The server loop: resolve the reader once, warm it, then fork a child per job."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever readers print goes nowhere; results use the saved descriptor
    budget = int(config["budget"])
    os.environ["MEDTL_MAX_INPUT_BYTES"] = str(budget)
    reader = resolve(config["reader"])
    for path in config.get("warm", []):  # lazy imports (decoders, Pillow plugins) happen here, once
        with contextlib.suppress(BaseException):  # (whatever the warm-up file gives)
            reader(path)
    gc.collect()
    state: dict = {"child": None}

    def stop(signum, frame):
        if state["child"]:
            kill_group(state["child"])
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    proto.write("ready\n")
    for line in sys.stdin:
        job = json.loads(line)
        result = fork_read(job["path"], float(job["timeout"]), reader, budget, state)
        proto.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
