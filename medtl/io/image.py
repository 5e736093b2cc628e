"""PNG/JPEG/TIFF image files read with Pillow (8- or 16-bit, grey or RGB).

A picture's full scale (255 or 65535) is kept as ``Scan.value_max``: exported images are
already windowed, so medtl scales them by their type's range rather than stretching them.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medtl.errors import (
    CorruptImageError,
    FileMissingError,
    InputTooLargeError,
    MedtlInputError,
    UnsupportedFormatError,
)
from medtl.io.guard import reading, safe_message
from medtl.io.limits import read_limits
from medtl.io.scan import Scan, is_colour, luminance


def read_picture(path: str | Path) -> Scan:
    """Read a PNG/JPEG/TIFF as a (rows, columns) float32 image; a colour picture keeps its RGB in
    ``Scan.rgb`` (``Scan.array`` is then its luminance).

    The pixel count is checked against the memory budget (:mod:`medtl.io.limits`) from the
    header, before any pixel is decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileMissingError(path, "file not found" if not path.exists() else "not a regular file")
    with reading(path, "image"):
        try:
            array, rgb, fmt, mode = _decode_picture(path)
        except MedtlInputError:
            raise
        except UnidentifiedImageError:
            raise UnsupportedFormatError(path, "not a readable PNG/JPEG/TIFF image") from None
        except Image.DecompressionBombError:
            raise InputTooLargeError(
                path,
                f"picture declares more pixels than the memory budget allows ({Image.MAX_IMAGE_PIXELS} pixels)",
                "a smaller picture",
            ) from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
            raise CorruptImageError(path, f"image data is damaged ({safe_message(e)})") from None
    if array.ndim != 2 or array.size == 0 or not np.all(np.isfinite(array)):
        raise CorruptImageError(path, f"unexpected image shape {array.shape} or values that are not finite")
    return Scan(
        array=array,
        spacing=(1.0, 1.0),
        modality="",
        source="image",
        path=path,
        value_max=_full_scale(mode, array),
        header={"file_format": fmt},
        rgb=rgb,
    )


COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "1")
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10; each scan decodes the whole picture again


def _check_scans(path: Path) -> None:
    """Refuse a JPEG of more scans than a progressive encoder writes (6,000 took Pillow 41 s)."""
    with open(path, "rb") as f:
        scans = f.read().count(b"\xff\xda")  # start of scan; in entropy-coded data 0xFF is followed by 0x00
    if scans > MAX_JPEG_SCANS:
        raise InputTooLargeError(
            path, f"JPEG of {scans} scans, more than {MAX_JPEG_SCANS}; refused before decoding", "a usual JPEG"
        )


def _decode_picture(path: Path) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """(grey values, RGB or None, file format, Pillow mode) of a picture, decoded once its size fits the budget."""
    budget = read_limits().max_bytes
    Image.MAX_IMAGE_PIXELS = budget // 20  # Pillow's own bomb check, from the same budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget check below decides
        with Image.open(path) as im:
            width, height = im.size
            bands = len(im.getbands())
            colour = im.mode in COLOUR_MODES
            # decoded bands, then grey: + float32 grey (and slack); colour: + 8-bit RGB + float32 RGB + float32 grey
            per_pixel = bands + 3 + 12 + 4 + 4 if colour else bands * 4 + 16
            read_limits().check(path, width * height * per_pixel, f"a {width}x{height} picture")
            if width < 1 or height < 1:
                raise CorruptImageError(path, f"picture of {width}x{height} pixels")
            if im.format == "JPEG":
                _check_scans(path)
            im.load()
            rgb = None
            if colour:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
                array = luminance(rgb)
                rgb = rgb if is_colour(rgb) else None  # a grey picture stored as RGB stays grey
            else:  # L, I;16, I, F
                array = np.asarray(im, dtype=np.float32)
            return array, rgb, im.format or "", im.mode


def _full_scale(mode: str, array: np.ndarray) -> float | None:
    """A picture's full-scale value by its Pillow mode: 65535 (16-bit), None (float or wider ints) or 255."""
    if mode.startswith("I;16") or (mode == "I" and array.min() >= 0 and array.max() <= 65535):
        return 65535.0
    if mode == "F" or mode == "I":
        return None
    return 255.0
