"""The transform chains: reading and scaling (cacheable), then resizing to the encoder's input and its
normalisation, the same for training and inference (:func:`create_transforms`)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped, MapTransform, Resize, Resized, SpatialPadd

from medtl.config import DataConfig
from medtl.errors import ConfigError
from medtl.models.encoders import Preprocessing
from medtl.transforms.augment import BatchAugment
from medtl.transforms.read import LoadScan2Dd


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
        raise ConfigError(
            None,
            f"volume_mode {data.volume_mode!r} with a {dims}D encoder",
            "volume_mode '3d' with a 3D encoder (resnet18_3d, ...), any other mode with a 2D one",
        )
    deterministic = Compose([LoadScan2Dd("image", data, max_size=size, channels=pre.in_chans)])
    final: list = [
        EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
        Resized(
            "image",
            spatial_size=size,
            size_mode="longest",
            mode="bilinear" if dims == 2 else "trilinear",
            anti_aliasing=False,
        ),
        SpatialPadd("image", spatial_size=(size,) * dims, mode="constant"),
    ]
    final.append(EncoderInputd("image", pre))
    if not train:
        return deterministic, Compose(final)
    augment = BatchAugment(pre, flip=data.flip, color_jitter=data.color_jitter) if data.augment else None
    return deterministic, TrainingTransform(final, augment)


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
                raise ConfigError(
                    None,
                    f"{x.shape[1]}-channel inputs for an encoder with {self.channels}",
                    "1-channel inputs, or an encoder with as many input channels",
                )
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
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - rh) // 2, (size - rw) // 2
    crop = saliency[top : top + rh, left : left + rw]
    return np.asarray(Resize((h, w), mode="bilinear")(crop[None]))[0]


__all__ = ["create_transforms", "TrainingTransform", "EncoderInputd", "split_final", "input_to_original"]
