"""Reading a sample's scan into arrays: 3D volumes into 2D inputs (middle, MIP, 2.5D, every slice), the
MONAI transform that loads a scan, and the helpers that split a decoded sample into model inputs and
give the image a result is drawn on."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, MapTransform, Resize

from medtl.config import DataConfig
from medtl.errors import ConfigError, CorruptImageError
from medtl.io import Scan, read_image
from medtl.io.scan import is_colour, luminance
from medtl.transforms.intensity import intensity_preset, scale_colour, scale_intensity, use_colour


def volume_inputs(volume: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs from a scaled (C, slices, rows, columns) volume and the slice each one shows.

    Returns ``(inputs, slice_index)``: inputs is (n_inputs, channels, rows, columns);
    "middle"/"mip" give one input, "2.5d" one input of 3 adjacent slices, "slices" every slice,
    "slices_2.5d" every slice with its two neighbours as channels (edges repeat).
    """
    c, n = volume.shape[:2]
    middle = n // 2
    if mode == "mip":
        return volume.max(axis=1)[None], np.array([-1])
    if mode == "middle":
        return volume[:, middle][None], np.array([middle])
    idx = np.arange(n)
    if mode == "slices":
        return volume.transpose(1, 0, 2, 3), idx
    if c != 1:
        raise ConfigError(None, "2.5d volume modes need single-window intensities", "volume_mode 'slices' or 'middle'")
    neighbours = np.stack([np.clip(idx - 1, 0, n - 1), idx, np.clip(idx + 1, 0, n - 1)], axis=1)
    stacks = volume[0][neighbours]  # (n, 3, rows, columns)
    if mode == "2.5d":
        return stacks[middle][None], np.array([middle])
    return stacks, idx


def scan_from_array(array: np.ndarray, name: str, modality: str = "") -> Scan:
    """A :class:`Scan` for an in-memory image (a MedMNIST entry): 2D (H, W), 3D (D, H, W) or colour (H, W, 3)."""
    value_max = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else None
    rgb = None
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:  # (H, W, RGB)
        rgb = array[..., :3].astype(np.float32)
        array = luminance(rgb)
        rgb = rgb if is_colour(rgb) else None
    return Scan(
        array=np.asarray(array, np.float32),
        spacing=(1.0,) * array.ndim,
        modality=modality,
        source="array",
        path=Path(name),
        value_max=value_max,
        rgb=rgb,
    )


class LoadScan2Dd(MapTransform):
    """Read ``d[key]`` (a path, or an in-memory array) into scaled 2D model inputs.

    Output: ``d[key]`` is (channels, rows, columns) in [0, 1] — or, for the "slices" volume
    modes, (slices * channels, rows, columns) with ``d["n_inputs"]`` slices, to be split by
    :func:`split_slices`. Images larger than ``max_size`` on their longest side are shrunk
    (aspect kept) so cached inputs stay small. Kept for drawing results on the original:
    ``d["path"]``, ``d["original_shape"]`` (2D size before shrinking), ``d["slice_index"]``.
    """

    def __init__(self, keys, data: DataConfig, max_size: int | None = None, channels: int = 3):
        super().__init__(keys)
        self.data = data
        self.max_size = max_size
        self.channels = channels  # the encoder's input channels: colour needs 3

    def read(self, d: Mapping) -> Scan:
        item = d[self.keys[0]]
        if isinstance(item, Scan):  # read already (e.g. in the bounded reader)
            return item
        if isinstance(item, np.ndarray):
            return scan_from_array(item, str(d.get("path", "array")), str(d.get("modality") or ""))
        return read_image(item, volume_index=self.data.volume_index)

    def __call__(self, d: Mapping[Hashable, object]) -> dict:
        d = dict(d)
        for key in self.key_iterator(d):
            scan = self.read(d)
            d["path"] = str(d.get("path") or scan.path)
            preset = intensity_preset(scan, str(d.get("modality") or scan.modality), self.data)
            colour = use_colour(scan, self.data, self.channels)
            scaled = (
                scale_colour(scan.rgb, preset, self.data, scan)
                if colour
                else scale_intensity(scan.array, preset, self.data, scan)
            )  # (C, [D,] H, W)
            d["scan_colour"] = colour
            d["scan_ndim"] = int(scan.array.ndim if scan.is_volume else 2)
            d["scan_min_side"] = int(min(scan.array.shape[-2:]))  # in-plane size, rows or columns
            d["scan_modality"] = (str(d.get("modality") or scan.modality) or "unknown").upper()
            if self.data.volume_mode == "3d":  # the whole volume is one input of a 3D network
                if scaled.ndim != 4 or scan.array.shape[0] < 2:
                    raise CorruptImageError(
                        d["path"],
                        f"a {scan.array.ndim}D image where volume_mode '3d' needs a volume",
                        "a 3D scan (or a 2D volume mode)",
                    )
                d["original_shape"] = np.asarray(scaled.shape[-3:])
                d["slice_index"], d["n_inputs"] = np.array([-1]), 1
                if self.max_size and max(scaled.shape[-3:]) > self.max_size:
                    scaled = np.asarray(Resize(self.max_size, size_mode="longest", mode="area")(scaled), np.float32)
                d[key] = scaled
                continue
            if scaled.ndim == 4:
                inputs, index = volume_inputs(scaled, self.data.volume_mode)
            else:
                inputs, index = scaled[None], np.array([-1])
            d["original_shape"] = np.asarray(inputs.shape[-2:])
            d["slice_index"] = index
            d["n_inputs"] = len(inputs)
            flat = inputs.reshape(-1, *inputs.shape[-2:])
            if self.max_size and max(flat.shape[-2:]) > self.max_size:
                flat = np.asarray(Resize(self.max_size, size_mode="longest", mode="area")(flat), np.float32)
            d[key] = flat
        return d


def split_slices(sample: dict) -> list[dict]:
    """One sample per model input of a decoded sample (several for the "slices" volume modes)."""
    n = int(sample.get("n_inputs", 1))
    if n == 1:
        out = dict(sample)
        out["slice_index"] = int(np.asarray(sample.get("slice_index", [-1]))[0])
        return [out]
    image = sample["image"]
    c = image.shape[0] // n
    return [
        {**sample, "image": image[i * c : (i + 1) * c], "slice_index": int(sample["slice_index"][i]), "n_inputs": 1}
        for i in range(n)
    ]


def prepare_inputs(sample: dict, final: Compose) -> tuple[torch.Tensor, list[dict]]:
    """Model inputs (n, C, size, size) of a decoded sample, one per slice in the "slices" modes, and
    the parts they came from (each with its ``slice_index``)."""
    parts = split_slices(sample)
    return torch.stack([torch.as_tensor(final({"image": p["image"], "label": 0})["image"]) for p in parts]), parts


def display_image(part: dict) -> np.ndarray:
    """The image in [0, 1] to draw a result on: (H, W, 3) RGB for a colour input, else (H, W), the
    middle channel (the slice itself in 2.5d)."""
    channels = np.asarray(part["image"])
    if part.get("scan_colour"):
        n = int(part.get("n_inputs", 1) or 1)  # a whole study of n colour slices: its middle slice
        middle = (n // 2) * 3 if channels.shape[0] == 3 * n else 0
        return np.ascontiguousarray(channels[middle : middle + 3].transpose(1, 2, 0))
    return channels[channels.shape[0] // 2]


__all__ = ["LoadScan2Dd", "volume_inputs", "scan_from_array", "split_slices", "prepare_inputs", "display_image"]
