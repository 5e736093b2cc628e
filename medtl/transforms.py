"""MONAI transform chains built from the data config and the encoder's preprocessing record.

The same function builds the training and the inference chain, so a saved model is always fed
exactly as it was trained. Samples are dicts: ``{"image": path or array, "label": int, "modality": str}``.

Intensity presets by modality (CT HU windows, including a 3-window channel stack; the file's own
VOI window for X-ray; percentiles for MR; type range for pictures) and the ways a volume feeds a
2D encoder (middle slice, MIP, 2.5D, every slice with aggregation back to a study score) are
chosen here from :class:`medtl.config.DataConfig`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.networks.layers import AffineTransform
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Resize,
    Resized,
    ScaleIntensityRange,
    SpatialPadd,
)

from medtl.config import CT_WINDOWS, DataConfig
from medtl.errors import ConfigError, CorruptImageError, MedtlInputError
from medtl.io import Scan, read_image
from medtl.io.scan import is_colour, luminance
from medtl.models.encoders import Preprocessing


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
            raise MedtlInputError(scan.path, "intensity 'file_window' but the file has no VOI window",
                                  "a DICOM with WindowCenter/WindowWidth, or another data.intensity")
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
            t = ScaleIntensityRange(a_min=float(lo), a_max=float(hi) if hi > lo else float(lo) + 1.0,
                                    b_min=0.0, b_max=1.0, clip=True)
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
        raise MedtlInputError(scan.path, "a grey image where data.color is 'rgb'", "a colour image, or data.color 'auto'")
    if scan.is_volume and data.volume_mode in ("2.5d", "slices_2.5d"):
        return False  # the three channels are neighbouring slices: luminance
    return scan.rgb is not None and data.color != "grey" and channels == 3


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
    return Scan(array=np.asarray(array, np.float32), spacing=(1.0,) * array.ndim, modality=modality,
                source="array", path=Path(name), value_max=value_max, rgb=rgb)


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
            scaled = scale_colour(scan.rgb, preset, self.data, scan) if colour else \
                scale_intensity(scan.array, preset, self.data, scan)  # (C, [D,] H, W)
            d["scan_colour"] = colour
            d["scan_ndim"] = int(scan.array.ndim if scan.is_volume else 2)
            d["scan_min_side"] = int(min(scan.array.shape[-2:]))  # in-plane size, rows or columns
            d["scan_modality"] = (str(d.get("modality") or scan.modality) or "unknown").upper()
            if self.data.volume_mode == "3d":  # the whole volume is one input of a 3D network
                if scaled.ndim != 4 or scan.array.shape[0] < 2:
                    raise CorruptImageError(d["path"], f"a {scan.array.ndim}D image where volume_mode '3d' "
                                            "needs a volume", "a 3D scan (or a 2D volume mode)")
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
    return [{**sample, "image": image[i * c:(i + 1) * c], "slice_index": int(sample["slice_index"][i]),
             "n_inputs": 1} for i in range(n)]


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
        return np.ascontiguousarray(channels[middle:middle + 3].transpose(1, 2, 0))
    return channels[channels.shape[0] // 2]


def aggregate_slices(probs: np.ndarray, how: str, k: int = 3) -> np.ndarray:
    """A study's class probabilities from its slices' (n_slices, n_classes) probabilities."""
    if len(probs) == 1:
        return probs[0]
    if how == "mean":
        return probs.mean(axis=0)
    if how == "max":  # each class its highest slice score, renormalised
        p = probs.max(axis=0)
        return p / p.sum()
    top = np.sort(probs, axis=0)[-min(k, len(probs)):]  # top-k mean per class, renormalised
    p = top.mean(axis=0)
    return p / p.sum()


def aggregate_studies(labels: np.ndarray, probs: np.ndarray, studies: np.ndarray, how: str = "mean",
                      k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One row per study (in order of first appearance) from per-input labels and probabilities."""
    order = list(dict.fromkeys(np.asarray(studies).tolist()))
    if len(order) == len(studies):
        return labels, probs
    return (np.asarray([labels[studies == s][0] for s in order]),
            np.stack([aggregate_slices(probs[studies == s], how, k) for s in order]))


def create_transforms(data: DataConfig, pre: Preprocessing, train: bool) -> tuple[Compose, Compose]:
    """Return ``(deterministic, final)`` chains.

    ``deterministic`` reads, scales and shrinks (its output can be cached); ``final`` resizes
    to the encoder's input (aspect kept, padded to a square) and ends with :class:`EncoderInputd`
    (the encoder's channel repeat and mean/std normalisation): the same for training and inference.
    A data set stores its inputs as they are before that last step and applies it to whole batches
    on the device (:func:`split_final`). With ``train``,
    ``final`` is a :class:`TrainingTransform` whose :class:`BatchAugment` (``data.augment``) the
    training loop applies to whole batches on its device.
    """
    size, dims = pre.input_size, pre.spatial_dims
    if (dims == 3) != (data.volume_mode == "3d"):
        raise ConfigError(None, f"volume_mode {data.volume_mode!r} with a {dims}D encoder",
                          "volume_mode '3d' with a 3D encoder (resnet18_3d, ...), any other mode with a 2D one")
    deterministic = Compose([LoadScan2Dd("image", data, max_size=size, channels=pre.in_chans)])
    final: list = [
        EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
        Resized("image", spatial_size=size, size_mode="longest", mode="bilinear" if dims == 2 else "trilinear",
                anti_aliasing=False),
        SpatialPadd("image", spatial_size=(size,) * dims, mode="constant"),
    ]
    final.append(EncoderInputd("image", pre))
    if not train:
        return deterministic, Compose(final)
    augment = BatchAugment(pre, flip=data.flip, color_jitter=data.color_jitter) if data.augment else None
    return deterministic, TrainingTransform(final, augment)


class BatchAugment:
    """Training augmentation of whole batches, on the device the model trains on.

    Per sample: with probability 0.5 a random affine (MONAI's ``AffineTransform``: rotation up to
    10 degrees in plane, zoom of each axis by up to 10 %, shift by up to 5 % of the side; zeros
    outside), with 0.3 a contrast gamma in [0.8, 1.25], with 0.3 Gaussian noise (sigma up to 0.02),
    and with 0.5 a left-right flip (``flip``). The batch arrives normalised by the encoder's mean and
    std; it is augmented on the [0, 1] intensities (as MONAI's per-sample chain did) and normalised
    again. 3D volumes rotate in the slice plane only. One batched call costs a fraction of the
    per-sample chain, so it hides behind the training step. Random parameters come from the
    object's own generator (``set_random_state``), so seeded runs repeat exactly.
    """

    def __init__(self, pre: Preprocessing, flip: bool = True, rotate_deg: float = 10.0, zoom: float = 0.1,
                 shift: float = 0.05, seed: int = 0, color_jitter: float = 0.0, cutout: float = 0.0,
                 gamma: tuple[float, float] = (0.8, 1.25), noise: float = 0.02):
        self.pre, self.flip, self.color_jitter = pre, flip, float(color_jitter)
        self.rotate, self.zoom, self.shift = np.deg2rad(rotate_deg), zoom, shift
        self.cutout, self.gamma, self.noise = float(cutout), tuple(gamma), float(noise)
        self.warp = AffineTransform(normalized=False, zero_centered=True, align_corners=False, padding_mode="zeros")
        self.set_random_state(seed)

    def stronger(self, seed: int) -> "BatchAugment":
        """The strong view of semi-supervised consistency training (FixMatch's, in kind): rotations up to 30
        degrees, zoom by up to 25 %, shifts up to 12.5 %, gamma in [0.5, 2], noise up to 0.05, twice the
        colour jitter, and a cut-out square (side up to half the image) filled with mid-grey."""
        return BatchAugment(self.pre, self.flip, 30.0, 0.25, 0.125, seed, min(0.5, 2 * self.color_jitter), 0.5,
                            (0.5, 2.0), 0.05)

    def set_random_state(self, seed: int) -> "BatchAugment":
        self.R = torch.Generator().manual_seed(int(seed))
        self._device_R: dict[str, torch.Generator] = {}
        return self

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of the per-pixel noise: the CPU one on a CPU; on another device one of its own,
        seeded from it at first use (the noise is drawn where the batch is, not copied there)."""
        if device.type == "cpu":
            return self.R
        if str(device) not in self._device_R:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.R))
            self._device_R[str(device)] = torch.Generator(device=device).manual_seed(seed)
        return self._device_R[str(device)]

    def _uniform(self, *shape, low=-1.0, high=1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.R)

    def affines(self, n: int, dims: int, size: int) -> torch.Tensor:
        """(n, dims + 1, dims + 1) random affines in array index order, about the centre."""
        affine = torch.eye(dims + 1).repeat(n, 1, 1)
        angle = self._uniform(n) * self.rotate
        a, b = dims - 2, dims - 1  # the in-plane axes (rows, columns)
        rot = affine.clone()
        rot[:, a, a], rot[:, a, b], rot[:, b, a], rot[:, b, b] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        affine[:, range(dims), range(dims)] = 1 + self._uniform(n, dims) * self.zoom
        affine = rot @ affine
        affine[:, :dims, dims] = self._uniform(n, dims) * self.shift * size
        return affine

    def _chosen(self, n: int, p: float, device) -> torch.Tensor:
        """Indices of the samples (drawn with probability ``p``) that get an augmentation."""
        return torch.nonzero(torch.rand(n, generator=self.R) < p).flatten().to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, dims = x.shape[0], x.ndim - 2
        view = (1, -1) + (1,) * dims
        mean = torch.as_tensor(self.pre.mean, dtype=x.dtype, device=x.device).view(view)
        std = torch.as_tensor(self.pre.std, dtype=x.dtype, device=x.device).view(view)
        x = x * std + mean  # back to [0, 1] intensities (a new tensor: the batch itself is not changed)
        # each step touches only the samples it was drawn for
        idx = self._chosen(n, 0.5, x.device)
        if len(idx):
            x[idx] = self.warp(x[idx].contiguous(), self.affines(len(idx), dims, x.shape[-1]).to(x.device))
        idx = self._chosen(n, 0.3, x.device)
        if len(idx):  # contrast: MONAI's RandAdjustContrast, per sample over its own range
            part = x[idx]
            flat = part.reshape(len(idx), -1)
            shape = (len(idx),) + (1,) * (dims + 1)
            lo, hi = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
            span = hi - lo + 1e-7
            gamma = self._uniform(len(idx), low=self.gamma[0], high=self.gamma[1]).to(x.device).view(shape)
            x[idx] = ((part - lo) / span).clamp_min(0) ** gamma * span + lo
        idx = self._chosen(n, 0.3, x.device)
        if len(idx):  # noise, the same in every channel (as on the single-channel image before the repeat)
            sigma = self._uniform(len(idx), low=0.0, high=self.noise).view((len(idx),) + (1,) * (dims + 1))
            noise = torch.randn((len(idx), 1) + x.shape[2:], generator=self._generator(x.device), device=x.device)
            x[idx] += sigma.to(x.device) * noise
        if self.color_jitter > 0 and x.shape[1] == 3:
            idx = self._chosen(n, 0.8, x.device)
            if len(idx):
                x[idx] = self.jitter(x[idx].clamp(0, 1))
        if self.flip:
            idx = self._chosen(n, 0.5, x.device)
            if len(idx):
                x[idx] = x[idx].flip(-1)
        if self.cutout > 0:  # one square per sample, mid-grey, side up to cutout * the image's side
            size = x.shape[-1]
            for i in range(n):
                side = max(1, int(float(self._uniform(1, low=0.0, high=self.cutout)) * size))
                corner = [int(v) for v in torch.randint(0, size - side + 1, (dims,), generator=self.R)]
                region = (i, slice(None)) + tuple(slice(c, c + side) for c in corner)
                x[region] = 0.5
        return (x - mean) / std

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Colour and illumination jitter of RGB samples in [0, 1] (strength ``color_jitter`` = j):
        brightness and contrast by factors in [1 - j, 1 + j], saturation by [1 - 2j, 1 + 2j], hue
        turned by up to j/2 of a full turn (a rotation of the chroma plane in YIQ), and a gain per
        channel in [1 - j/2, 1 + j/2] (stain and illumination differences). Grey inputs (three
        equal channels) keep equal channels except for the per-channel gain."""
        j, m = self.color_jitter, len(x)
        shape = (m,) + (1,) * (x.ndim - 1)

        def factor(spread):
            return (1 + self._uniform(m) * spread).view(shape).to(x.device, x.dtype)

        x = x * factor(j)
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        x = (x - mean) * factor(j) + mean
        grey = (x * torch.as_tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(
            (1, 3) + (1,) * (x.ndim - 2))).sum(1, keepdim=True)
        x = (x - grey) * factor(2 * j) + grey
        yiq = torch.as_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                              dtype=x.dtype, device=x.device)
        angle = (self._uniform(m) * np.pi * j).to(x.device, x.dtype)
        rot = torch.zeros(m, 3, 3, dtype=x.dtype, device=x.device)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, angle.cos(), angle.cos()
        rot[:, 1, 2], rot[:, 2, 1] = -angle.sin(), angle.sin()
        turn = torch.linalg.inv(yiq) @ rot @ yiq  # (m, 3, 3): hue rotation in RGB
        x = torch.einsum("mij,mj...->mi...", turn, x)
        gain = (1 + self._uniform(m, 3) * j / 2).to(x.device, x.dtype).view((m, 3) + (1,) * (x.ndim - 2))
        return (x * gain).clamp(0, 1)


class TrainingTransform(Compose):
    """A training set's per-sample chain (the same as inference's) plus the :class:`BatchAugment`
    that :func:`medtl.train.fit` applies to each of its batches on the training device."""

    def __init__(self, transforms, batch_augment: BatchAugment | None):
        self.batch_augment = batch_augment  # (before Compose's __init__, which seeds every part)
        super().__init__(transforms)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        if self.batch_augment is not None and seed is not None:
            self.batch_augment.set_random_state(seed)
        return self


class EncoderInputd(MapTransform):
    """The last step of every chain: a 1-channel input repeated to the encoder's channels, then
    ``(x - mean) / std`` per channel, as float32. :meth:`batch` does the same to a whole batch on
    its own device; the per-sample call goes through it, so both give the same numbers."""

    def __init__(self, keys, pre: Preprocessing):
        super().__init__(keys)
        self.channels, self.mean, self.std = pre.in_chans, tuple(pre.mean), tuple(pre.std)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A new float32 (N, channels, ...) tensor from an (N, 1 or channels, ...) batch of [0, 1] intensities."""
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ConfigError(None, f"{x.shape[1]}-channel inputs for an encoder with {self.channels}",
                                  "1-channel inputs, or an encoder with as many input channels")
            x = x.expand(-1, self.channels, *x.shape[2:])
        view = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device).view(view)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=x.device).view(view)
        return (x.float() - mean) / std

    def __call__(self, d):
        d = dict(d)
        for key in self.key_iterator(d):
            x = d[key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))  # (no MetaTensor)
            d[key] = self.batch(x[None])[0]
        return d


def split_final(final: Compose) -> tuple[Compose, EncoderInputd | None]:
    """(the chain before its last step, that step) when the chain ends with :class:`EncoderInputd`;
    (``final``, None) otherwise: its whole output is then stored and used as it is."""
    transforms = list(getattr(final, "transforms", [final]))
    if not transforms or not isinstance(transforms[-1], EncoderInputd):
        return final, None
    return Compose(transforms[:-1]), transforms[-1]


def input_to_original(saliency: np.ndarray, original_shape: tuple[int, int], size: int) -> np.ndarray:
    """Undo the pad-to-square and resize of :func:`create_transforms` on a (size, size) map."""
    h, w = (int(v) for v in original_shape)
    scale = size / max(h, w)
    rh, rw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    top, left = (size - rh) // 2, (size - rw) // 2
    crop = saliency[top:top + rh, left:left + rw]
    return np.asarray(Resize((h, w), mode="bilinear")(crop[None]))[0]


__all__ = ["intensity_preset", "scale_intensity", "volume_inputs", "scan_from_array", "LoadScan2Dd", "split_slices",
           "prepare_inputs", "display_image", "aggregate_slices", "aggregate_studies", "create_transforms",
           "BatchAugment", "TrainingTransform", "EncoderInputd", "split_final", "input_to_original", "XRAY_MODALITIES"]
