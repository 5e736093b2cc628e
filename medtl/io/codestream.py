"""What a compressed DICOM frame says of its own size, read from its codestream before it is decoded.

A decoder allocates what the codestream declares, not what the DICOM header declares: a 1.7 KB JPEG 2000
file whose header says 64 x 64 can hold a 22000 x 22000 codestream, and the memory budget checked against
the header would not see it. :func:`check_codestreams` reads the size each frame's codestream declares
(the JPEG 2000 SIZ marker; the JPEG and JPEG-LS start-of-frame marker) and refuses a frame whose size is
not the header's, before any pixel is decoded.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.encaps import generate_frames

from medtl.errors import CorruptImageError

_HEAD = 1 << 16  # the bytes of a frame searched for its size (the markers come first)
_J2K_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the image and tile size marker
# start-of-frame markers: JPEG baseline to lossless (not DHT C4, JPG C8, DAC CC), JPEG-LS (F7)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def declared_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG 2000, JPEG or JPEG-LS codestream declares, or None when the
    frame is none of these (RLE, or unrecognised: its decoder then checks it)."""
    head = bytes(frame[:_HEAD])
    at = head.find(_J2K_SIZ)
    if at >= 0 and len(head) >= at + 4 + 38:
        xsiz, ysiz, xo, yo = struct.unpack(">4I", head[at + 8 : at + 24])
        (components,) = struct.unpack(">H", head[at + 40 : at + 42])
        return max(0, ysiz - yo), max(0, xsiz - xo), components
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _SOF and i + 10 <= len(head):
            rows, cols = struct.unpack(">HH", head[i + 5 : i + 9])
            return rows, cols, head[i + 9]
        i += 2 + length
    return None


def check_codestreams(ds: pydicom.Dataset, path: Path, frames: int, rows: int, cols: int, samples: int) -> None:
    """Refuse a compressed dataset any of whose frames' codestreams declares another size than the header."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return
    try:
        encoded = generate_frames(ds.PixelData, number_of_frames=frames)
        for k, frame in enumerate(encoded):
            if k >= frames:
                break
            size = declared_size(frame)
            if size is None:
                continue
            r, c, n = size
            # JPEG 2000 / JPEG (0 rows: a JPEG defining them later) may omit nothing else; a 0 is not checked
            if (r and r != rows) or c != cols or n not in (samples, 0):
                raise CorruptImageError(
                    path,
                    f"frame {k + 1}'s compressed image is {c} x {r} with {n} component(s), not the {cols} x {rows} "
                    f"with {samples} the header declares; refused before decoding",
                )
    except CorruptImageError:
        raise
    except Exception:
        return  # unreadable fragments: the decoder reports them with the file
