"""The one boundary every reader passes through: whatever pydicom, nibabel, Pillow, zipfile or
numpy raise while a file is read or converted leaves medtl as a typed error naming the file.

Library messages can quote header values, so only their first line is kept, with quoted text
replaced by ``'…'``: a garbled header may put a patient's name where a number was expected.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
import zlib
from pathlib import Path

from medtl.errors import CorruptImageError, InputTooLargeError, MedtlInputError

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


class _NoValues(logging.Filter):
    """Cuts quoted values from pydicom's log records ("Invalid value for VR PN: 'DOE^JOHN'")."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _QUOTED.sub("'…'", record.getMessage())
        record.args = ()
        return True


logging.getLogger("pydicom").addFilter(_NoValues())


def safe_message(e: BaseException, limit: int = 160) -> str:
    """``"TypeName: first line"`` of an exception, with quoted values removed."""
    lines = str(e).strip().splitlines()
    text = _QUOTED.sub("'…'", lines[0])[:limit] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def reading(path: str | Path | None, what: str):
    """Turn any exception raised inside the block into a :class:`MedtlInputError` about ``path``.

    ``what`` names the kind of content in the message ("DICOM file", "NIfTI volume", ...).
    Typed errors pass through; running out of memory becomes :class:`InputTooLargeError`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library warnings quote header values ("Invalid value for VR ...")
            yield
    except MedtlInputError:
        raise
    except MemoryError:
        raise InputTooLargeError(
            path,
            f"{what} needs more memory than one input may use; stopped",
            "a smaller input, or raise MEDTL_MAX_INPUT_BYTES where the machine has the memory",
        ) from None
    except RecursionError:
        raise CorruptImageError(path, f"{what} is nested too deeply to be parsed") from None
    except Exception as e:
        raise CorruptImageError(path, f"{what} cannot be read ({safe_message(e)})") from None


def inflate_capped(
    stream,
    cap: int,
    path: str | Path | None,
    what: str,
    wbits: int = -zlib.MAX_WBITS,
    chunk: int = 1 << 16,
    on_first=None,
) -> bytes:
    """Decompress a zlib/deflate/gzip ``stream`` (a file object) without producing more than ``cap`` bytes.

    ``on_first(head)`` is called once with the first MiB of output (or all of it, if less) and may
    return a smaller cap, e.g. once a header has said how large the content is. Raises
    InputTooLargeError as soon as the output would pass the cap.
    """
    d = zlib.decompressobj(wbits)
    out = bytearray()
    pending = b""
    checked = on_first is None
    while True:
        if not pending:
            pending = stream.read(chunk)
            if not pending:
                break
        out += d.decompress(pending, max(1, min(1 << 20, cap + 1 - len(out))))  # a MiB at a time
        pending = d.unconsumed_tail
        if not checked and (len(out) >= 1 << 20):
            cap = min(cap, on_first(bytes(out[: 1 << 20])) or cap)
            checked = True
        if len(out) > cap:
            raise InputTooLargeError(
                path,
                f"{what} inflates to more than {cap} bytes; refused while inflating",
                "a smaller input, or raise MEDTL_MAX_INPUT_BYTES",
            )
        if d.eof:
            break
    out += d.flush()
    if not checked:
        new_cap = on_first(bytes(out))
        if new_cap is not None and len(out) > new_cap:
            raise InputTooLargeError(path, f"{what} inflates to more than its header declares; refused")
    if len(out) > cap:
        raise InputTooLargeError(path, f"{what} inflates to more than {cap} bytes; refused")
    return bytes(out)


def inflate_head(stream, size: int, wbits: int = -zlib.MAX_WBITS, chunk: int = 1 << 16) -> bytes:
    """The first ``size`` bytes (or fewer, if the stream ends) a zlib/deflate ``stream`` inflates to: for a
    header, without inflating what follows it."""
    d = zlib.decompressobj(wbits)
    out = bytearray()
    while len(out) < size and not d.eof:
        data = d.unconsumed_tail or stream.read(chunk)
        if not data:
            break
        out += d.decompress(data, size - len(out))
    return bytes(out)
