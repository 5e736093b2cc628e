"""PNG/JPEG/TIFF image files read with Pillow (8- or 16-bit, grey or RGB).

A picture's full scale (255 or 65535) is kept as ``Scan.value_max``: exported images are
already windowed, so medtl scales them by their type's range rather than stretching them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medtl.errors import CorruptImageError, UnsupportedFormatError
from medtl.io.scan import Scan


def read_picture(path: str | Path) -> Scan:
    """Read a PNG/JPEG/TIFF as a grey (rows, columns) float32 image; RGB is converted to luminance."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                array = np.asarray(im.convert("RGB"), dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            else:  # L, I;16, I, F
                array = np.asarray(im, dtype=np.float32)
            fmt = im.format or ""
            mode = im.mode
    except UnidentifiedImageError:
        raise UnsupportedFormatError(path, "not a readable PNG/JPEG/TIFF image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(path, f"image data is damaged ({str(e)[:160]})") from None
    if array.ndim != 2 or array.size == 0:
        raise CorruptImageError(path, f"unexpected image shape {array.shape}")
    if mode.startswith("I;16") or (mode == "I" and array.min() >= 0 and array.max() <= 65535):
        value_max = 65535.0
    elif mode == "F" or mode == "I":
        value_max = None
    else:
        value_max = 255.0
    return Scan(array=array, spacing=(1.0, 1.0), modality="", source="image", path=path, value_max=value_max,
                header={"file_format": fmt})
