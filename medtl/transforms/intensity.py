"""Intensity presets by modality: CT Hounsfield windows (one, or three stacked as channels), the file's
own VOI window for X-ray, percentiles for MR, the type's range for pictures; colour kept for colour sources."""

from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRange

from medtl.config import CT_WINDOWS, DataConfig
from medtl.errors import MedtlInputError
from medtl.io import Scan

XRAY_MODALITIES = ("CR", "DX", "DR", "MG", "RF", "XA", "PX", "IO", "XR", "DF")


def intensity_preset(scan: Scan, modality: str, data: DataConfig) -> str:
    """Which intensity scaling a scan gets: "ct_window", "file_window", "percentile" or "dtype".

    ``auto``: CT → its HU window; X-ray (CR/DX/MG...) → the file's own VOI window where it has
    one, else percentiles; MR and volumes without a modality → percentiles; pictures and arrays
    (PNG/JPEG, MedMNIST) → divided by their type's full scale (255 for 8-bit).
    """
    if scan.rgb is not None and data.color != "grey":  # colour: no windows; the type's range, else percentiles
        if data.intensity in ("percentile", "dtype") and not (data.intensity == "dtype" and scan.value_max is None):
            return data.intensity
        return "dtype" if scan.value_max is not None else "percentile"
    if data.intensity != "auto":
        if data.intensity == "file_window" and scan.window is None:
            raise MedtlInputError(
                scan.path,
                "intensity 'file_window' but the file has no VOI window",
                "a DICOM with WindowCenter/WindowWidth, or another data.intensity",
            )
        if data.intensity == "dtype" and scan.value_max is None:
            raise MedtlInputError(scan.path, "intensity 'dtype' needs an 8/16-bit picture or array")
        return data.intensity
    modality = (data.modality if data.modality != "auto" else modality).upper()
    if modality == "CT":
        return "ct_window"
    if modality in XRAY_MODALITIES:
        return "file_window" if scan.window is not None else "percentile"
    if scan.source in ("image", "array") and scan.value_max is not None:
        return "dtype"
    return "percentile"


def scale_intensity(image: np.ndarray, preset: str, data: DataConfig, scan: Scan) -> np.ndarray:
    """Map raw values to [0, 1], as a (channels, ...) array (3 channels for ``ct_window: multi``).

    ``file_window`` applies the file's own VOI: a VOI LUT table or a SIGMOID window exactly
    (:class:`medtl.io.dicom.FileVOI`), else its linear window. Padding pixels (``scan.padding``)
    are left out of the percentiles and come out as 0, the background.
    """

    def window(level, width):
        return ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)

    padding = scan.padding if scan.padding is not None and scan.padding.shape == image.shape else None
    if preset == "ct_window":
        names = data.ct_multi_windows if data.ct_window == "multi" else (data.ct_window,)
        out = np.stack([np.asarray(window(*CT_WINDOWS[n])(image), np.float32) for n in names])
    elif preset == "file_window" and scan.voi is not None:
        out = scan.voi.apply(image)[None]
    else:
        if preset == "file_window":
            t = window(*scan.window)
        elif preset == "dtype":
            t = ScaleIntensityRange(a_min=0.0, a_max=float(scan.value_max), b_min=0.0, b_max=1.0, clip=True)
        else:
            real = image if padding is None else image[~padding]
            lo, hi = np.percentile(real, data.percentiles)
            t = ScaleIntensityRange(
                a_min=float(lo), a_max=float(hi) if hi > lo else float(lo) + 1.0, b_min=0.0, b_max=1.0, clip=True
            )
        out = np.asarray(t(image), dtype=np.float32)[None]
    if padding is not None:
        out[:, padding] = 0.0
    return out


def scale_colour(rgb: np.ndarray, preset: str, data: DataConfig, scan: Scan) -> np.ndarray:
    """(…, 3) RGB → (3, …) in [0, 1]: by the type's full scale, or per channel by percentiles."""
    channels = np.moveaxis(np.asarray(rgb, np.float32), -1, 0)
    if preset == "dtype":
        return np.clip(channels / float(scan.value_max), 0.0, 1.0).astype(np.float32)
    out = np.empty_like(channels)
    for c in range(3):
        lo, hi = np.percentile(channels[c], data.percentiles)
        out[c] = np.clip((channels[c] - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return out


def use_colour(scan: Scan, data: DataConfig, channels: int = 3) -> bool:
    """Whether a scan goes to the encoder in RGB (``data.color``; needs a 3-channel encoder).

    Raises MedtlInputError for a grey source where ``data.color`` is "rgb".
    """
    if data.color == "rgb" and scan.rgb is None:
        raise MedtlInputError(
            scan.path, "a grey image where data.color is 'rgb'", "a colour image, or data.color 'auto'"
        )
    if scan.is_volume and data.volume_mode in ("2.5d", "slices_2.5d"):
        return False  # the three channels are neighbouring slices: luminance
    return scan.rgb is not None and data.color != "grey" and channels == 3


__all__ = ["XRAY_MODALITIES", "intensity_preset", "scale_intensity", "scale_colour", "use_colour"]
