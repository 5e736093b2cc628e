"""How much one input may cost: a memory budget checked before allocating, and a cap on files.

Every reader asks :func:`read_limits` before it allocates pixels, inflates a stream or reads a
zip member, and refuses with :class:`medtl.errors.InputTooLargeError` when the input would need
more. The defaults suit a workstation; set them per process with the environment variables
``MEDTL_MAX_INPUT_BYTES`` (bytes, or with a ``K``/``M``/``G`` suffix), ``MEDTL_MAX_INPUT_FILES`` and
``MEDTL_MAX_INPUT_CPU_S`` (seconds of processor time per read), or in code with :func:`set_read_limits` /
:func:`using_read_limits`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from medtl.errors import ConfigError, InputTooLargeError

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB per input (a 512x512x1000 CT in float32 is 1 GiB)
DEFAULT_MAX_FILES = 5000  # files in one folder or zip study
DEFAULT_TIMEOUT_S = 120.0  # wall-clock limit of one bounded read (see medtl.io.bounded)
DEFAULT_CPU_S = 30.0  # CPU time of one bounded read
DEFAULT_MAX_FRAMES = 20_000  # frames of one DICOM file (each costs the reader ~0.25 ms of Python: 5 s)


@dataclass(frozen=True)
class ReadLimits:
    """The budget of one input.

    ``max_bytes`` bounds what reading one input may allocate: the declared pixels once decoded
    and converted to float32, the inflated size of a deflated DICOM or a gzip stream, the bytes
    of a zip's members. ``max_files`` bounds the files of a folder or zip study. ``timeout_s`` (wall
    clock) and ``cpu_s`` (processor time) bound a read in the bounded worker, whose memory ``max_bytes``
    also caps: it may not grow past its size before the read plus ``max_bytes``. ``max_frames`` bounds the
    frames of one DICOM file, read in-process or not (a 252 KB file of 2 million 1x1 frames took 117 s).
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    timeout_s: float = DEFAULT_TIMEOUT_S
    cpu_s: float = DEFAULT_CPU_S
    max_frames: int = DEFAULT_MAX_FRAMES

    def check(self, path: str | Path | None, needed: int | float, what: str) -> None:
        """Raise InputTooLargeError when ``needed`` bytes exceed the budget."""
        if needed > self.max_bytes:
            raise InputTooLargeError(
                path,
                f"{what} needs {size_text(needed)}, over the memory budget of "
                f"{size_text(self.max_bytes)}; refused before allocating",
                "a smaller input, or raise MEDTL_MAX_INPUT_BYTES",
            )

    def check_frames(self, path: str | Path | None, frames: int) -> None:
        """Raise InputTooLargeError when a file declares more than ``max_frames`` frames."""
        if frames > self.max_frames:
            raise InputTooLargeError(
                path,
                f"{frames} frames, more than the {self.max_frames} one file may have; refused before reading",
                "a file of fewer frames, or a higher ReadLimits.max_frames",
            )

    def replace(self, **changes) -> ReadLimits:
        return replace(self, **changes)


def size_text(n: int | float) -> str:
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(text: str, name: str = "size") -> int:
    """``"2G"``, ``"512M"``, ``"1048576"`` → bytes (binary units)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise ConfigError(None, f"{name} {text!r} is not a size", "bytes, or a number with K, M or G") from None
    if not value > 0:
        raise ConfigError(None, f"{name} {text!r} must be positive")
    return int(value)


def _from_env() -> ReadLimits:
    limits = ReadLimits()
    if os.environ.get("MEDTL_MAX_INPUT_BYTES"):
        limits = limits.replace(max_bytes=parse_bytes(os.environ["MEDTL_MAX_INPUT_BYTES"], "MEDTL_MAX_INPUT_BYTES"))
    if os.environ.get("MEDTL_MAX_INPUT_FILES"):
        try:
            limits = limits.replace(max_files=int(os.environ["MEDTL_MAX_INPUT_FILES"]))
        except ValueError:
            raise ConfigError(None, "MEDTL_MAX_INPUT_FILES is not a whole number") from None
    if os.environ.get("MEDTL_MAX_INPUT_CPU_S"):
        try:
            cpu = float(os.environ["MEDTL_MAX_INPUT_CPU_S"])
        except ValueError:
            cpu = 0.0
        if not cpu > 0:
            raise ConfigError(None, "MEDTL_MAX_INPUT_CPU_S is not a positive number of seconds")
        limits = limits.replace(cpu_s=cpu)
    return limits


_current: ReadLimits | None = None


def read_limits() -> ReadLimits:
    """The limits in force: those set in code, else the environment's, else the defaults."""
    return _current if _current is not None else _from_env()


def set_read_limits(limits: ReadLimits | None) -> None:
    """Set the limits for this process (None: back to the environment and defaults)."""
    global _current
    _current = limits


@contextlib.contextmanager
def using_read_limits(limits: ReadLimits):
    """Run a block under other limits, restoring the previous ones after it."""
    global _current
    before = _current
    _current = limits
    try:
        yield limits
    finally:
        _current = before
