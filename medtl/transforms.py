"""MONAI transform chains built from the data config and the encoder's preprocessing record.

The same function builds the training and the inference chain, so a saved model is always fed
exactly as it was trained. Samples are dicts: ``{"image": path, "label": int, "modality": str}``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    RepeatChanneld,
    Resized,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPadd,
)

from medtl.config import CT_WINDOWS, DataConfig
from medtl.io import Scan, read_image
from medtl.models.encoders import Preprocessing


def intensity_preset(modality: str, data: DataConfig) -> str:
    """Which intensity handling a sample gets: "ct_window" or "percentile"."""
    if data.modality != "auto":
        modality = data.modality
    return "ct_window" if modality.upper() == "CT" else "percentile"


def to_2d(scan: Scan, mode: str) -> np.ndarray:
    """One 2D image from a scan: the image itself, a volume's middle slice or its MIP."""
    a = scan.array
    if a.ndim == 2:
        return a
    if mode == "mip":
        return a.max(axis=0)
    return a[a.shape[0] // 2]


def scale_intensity(image: np.ndarray, preset: str, data: DataConfig) -> np.ndarray:
    """Map raw values to [0, 1]: a CT window in HU, or robust percentiles for other modalities."""
    if preset == "ct_window":
        level, width = CT_WINDOWS[data.ct_window]
        t = ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)
    else:
        lo, hi = data.percentiles
        t = ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(t(image), dtype=np.float32)


class LoadScan2Dd(MapTransform):
    """Read ``d[key]`` (a path) into a (1, rows, columns) float32 image in [0, 1].

    Volumes become 2D by ``data.volume_mode``; intensities are scaled by the modality preset
    (``d["modality"]`` from the manifest, else the file's own). ``d["original_shape"]`` keeps the
    2D size before resizing and ``d["path"]`` the file, so saliency maps can be drawn back on the original pixels.
    """

    def __init__(self, keys, data: DataConfig):
        super().__init__(keys)
        self.data = data

    def __call__(self, d: Mapping[Hashable, object]) -> dict:
        d = dict(d)
        for key in self.key_iterator(d):
            d["path"] = str(d[key])
            scan = read_image(d[key])
            image = to_2d(scan, self.data.volume_mode)
            preset = intensity_preset(str(d.get("modality") or scan.modality), self.data)
            d[key] = scale_intensity(image, preset, self.data)[None]
            d["original_shape"] = np.asarray(image.shape)
        return d


def create_transforms(data: DataConfig, pre: Preprocessing, train: bool) -> tuple[Compose, Compose]:
    """Return ``(deterministic, final)`` chains.

    ``deterministic`` reads and resizes (its output can be cached); ``final`` adds the training
    augmentation (when ``train``) and the encoder's channel repeat and mean/std normalisation.
    """
    size = pre.input_size
    mode = "bilinear" if pre.interpolation not in ("bicubic", "nearest") else pre.interpolation
    deterministic = Compose([
        LoadScan2Dd("image", data),
        # keep the aspect ratio: longest side to `size`, then pad to a square
        Resized("image", spatial_size=size, size_mode="longest", mode="area"),
        SpatialPadd("image", spatial_size=(size, size), mode="constant"),
        EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
    ])
    final = []
    if train and data.augment:
        final += [
            RandRotated("image", range_x=np.deg2rad(10), prob=0.5, padding_mode="zeros"),
            RandZoomd("image", min_zoom=0.9, max_zoom=1.1, prob=0.5, padding_mode="constant"),
            RandFlipd("image", spatial_axis=1, prob=0.5),
            RandGaussianNoised("image", prob=0.3, std=0.02),
        ]
    if pre.in_chans > 1:
        final.append(RepeatChanneld("image", repeats=pre.in_chans))
    final += [
        NormalizeIntensityd("image", subtrahend=np.array(pre.mean), divisor=np.array(pre.std), channel_wise=True),
        EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return deterministic, Compose(final)


def input_to_original(saliency: np.ndarray, original_shape: tuple[int, int], size: int) -> np.ndarray:
    """Undo the pad-to-square and resize of :func:`create_transforms` on a (size, size) map."""
    from monai.transforms import Resize

    h, w = (int(v) for v in original_shape)
    scale = size / max(h, w)
    rh, rw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    top, left = (size - rh) // 2, (size - rw) // 2
    crop = saliency[top:top + rh, left:left + rw]
    return np.asarray(Resize((h, w), mode="bilinear")(crop[None]))[0]
