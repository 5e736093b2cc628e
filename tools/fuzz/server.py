"""One warm worker process (:mod:`tools.fuzz.worker`), seen from the run: :meth:`Server.read` returns a
child's outcome for one file."""

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]  # the worker runs here, so ``-m tools.fuzz.worker`` finds the package


class Server:
    """One warm server process; :meth:`read` returns a child's outcome for one file."""

    def __init__(
        self, reader: str, budget: int, warm: Sequence[str] = (), log: Path | None = None, scratch: Path | None = None
    ):
        self.config = {"reader": reader, "budget": budget, "warm": list(warm)}
        self.log = log
        self.scratch = scratch  # TMPDIR of the server and its children (a killed child leaves its files there)
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def _env(self) -> dict:
        env = dict(
            os.environ,
            OPENBLAS_NUM_THREADS="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            MEDTL_MAX_INPUT_BYTES=str(self.config["budget"]),
        )
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.scratch)
        return env

    def start(self) -> None:
        with open(self.log, "ab") if self.log else contextlib.nullcontext(subprocess.DEVNULL) as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.fuzz.worker", json.dumps(self.config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self._env(),
                cwd=ROOT,
                start_new_session=True,
            )
        self.buf = b""
        line = self._readline(300)
        if line != "ready":
            self.stop()
            raise RuntimeError(f"fuzz server did not start (got {line!r}); run with --log to see why")

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        """The worker's stdin and stdout."""
        if self.proc is None or self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("the fuzz server is not running")
        return self.proc.stdin, self.proc.stdout

    def _readline(self, seconds: float) -> str | None:
        deadline = time.monotonic() + seconds
        fd = self._pipes()[1].fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def read(self, path: str | Path, timeout: float) -> dict:
        """The outcome of reading ``path`` in a fresh child, killed after ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        t0 = time.monotonic()
        job = {"path": os.path.abspath(path), "timeout": timeout}  # (the worker runs in the repository root)
        try:
            stdin = self._pipes()[0]
            stdin.write((json.dumps(job) + "\n").encode())
            stdin.flush()
            line = self._readline(timeout + 30)
        except OSError:  # (BrokenPipeError included)
            line = None
        if line is None:  # the server itself died or hung: start a new one for the next file
            self.stop()
            return {
                "outcome": "killed",
                "error": "server lost",
                "message": "the fuzz server died or stopped answering",
                "seconds": round(time.monotonic() - t0, 4),
            }
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        stdin, stdout = self._pipes()
        try:
            stdin.close()
            self.proc.wait(5)
        except Exception:  # whatever went wrong, the process is ended below
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        stdout.close()
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
