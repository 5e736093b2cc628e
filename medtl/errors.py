"""Typed errors for everything a user can get wrong.

Every error about an input names the file (never a patient identifier), says what was wrong
and, where it helps, what would be accepted. Catch :class:`MedtlInputError` to handle them all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar


class MedtlError(Exception):
    """Base class of all medtl errors."""


class MedtlInputError(MedtlError, ValueError):
    """A file or value given to medtl cannot be used.

    Args:
        path: the offending file (shown by name in the message), or None for non-file input.
        problem: what was wrong.
        expected: what would have been accepted (optional).
    """

    def __init__(self, path: str | Path | None, problem: str, expected: str | None = None):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        self.expected = expected
        where = f"{self.path}: " if self.path is not None else ""
        hint = f" (expected {expected})" if expected else ""
        super().__init__(f"{where}{problem}{hint}")

    def __reduce__(self):  # pickled with its fields (errors cross the bounded reader's process boundary)
        return type(self), (self.path, self.problem, self.expected)


class FileMissingError(MedtlInputError, FileNotFoundError):
    """The file does not exist or is not readable."""


class UnsupportedFormatError(MedtlInputError):
    """The file is not of a kind medtl reads (or is not what its suffix claims)."""


class CorruptImageError(MedtlInputError):
    """The file is of a known kind but its content is damaged or inconsistent."""


class InputTooLargeError(MedtlInputError):
    """Reading the input would need more memory, files or time than its budget (``medtl.io.limits``)."""


class ManifestError(MedtlInputError):
    """A manifest (CSV of images, labels and patients) is malformed."""


class ConfigError(MedtlInputError):
    """An experiment configuration has an unknown key or an invalid value. The problem is cut to
    :data:`MAX_PROBLEM` characters: a value quoted in it may be a YAML bomb's expansion."""

    MAX_PROBLEM = 400

    def __init__(self, path, problem: str, expected: str | None = None):
        if len(problem) > self.MAX_PROBLEM + 40:  # (+40: an error sent whole across a process is not cut twice)
            problem = problem[: self.MAX_PROBLEM] + f"... ({len(problem)} characters)"
        super().__init__(path, problem, expected)


class RunExistsError(MedtlError, FileExistsError):
    """A run folder already holds results and ``force`` was not given."""


class RunError(MedtlError):
    """A run folder is missing files or does not match this version of medtl."""


class WeightsError(MedtlError):
    """Pretrained weights are missing, or do not match the architecture or their checksum."""


class MissingExtraError(MedtlError, ImportError):
    """A command needs an optional part of medtl that is not installed (``pip install 'medtl[EXTRA]'``);
    ``extra`` names it (:func:`medtl.extras.require`)."""

    def __init__(self, message: str, extra: str):
        self.extra = extra
        super().__init__(message)

    def __reduce__(self):  # pickled with its fields, like MedtlInputError
        return type(self), (str(self), self.extra)


class TrainingDivergedError(MedtlError, ArithmeticError):
    """The training loss or the model's outputs became NaN or infinite (learning rate too high)."""


def find_input_error(exc: BaseException) -> MedtlInputError | None:
    """The MedtlInputError behind ``exc`` (MONAI wraps errors raised inside transforms), or None."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MedtlInputError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def did_you_mean(given: str, valid: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest valid option, or ``""``."""
    close = difflib.get_close_matches(str(given), [str(v) for v in valid], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def did_you_mean_device(given: str) -> str:
    """:func:`did_you_mean` for a device: ``gpu``/``gpu:N`` (a common spelling) are pointed to ``cuda``/``cuda:N``."""
    alias = re.fullmatch(r"gpu(:\d+)?", str(given).strip().lower())
    return f"; did you mean 'cuda{alias[1] or ''}'?" if alias else did_you_mean(given, ["auto", "cpu", "cuda"])


_Option = TypeVar("_Option", bound=str)  # an option: a str, or one of a Literal's values


def look_up_option(given: _Option, valid: Iterable[str], what: str) -> _Option:
    """Return ``given`` if it is one of ``valid``, else raise a ConfigError listing the options."""
    valid = list(valid)
    if given in valid:
        return given
    raise ConfigError(
        None,
        f"unknown {what} {given!r}{did_you_mean(given, valid)}",
        expected="one of " + ", ".join(repr(v) for v in valid),
    )
