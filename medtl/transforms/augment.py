"""Training augmentation of whole batches on the training device (affine, flip, intensity, noise, colour)."""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.layers import AffineTransform

from medtl.models import Preprocessing


class BatchAugment:
    """Training augmentation of whole batches, on the device the model trains on.

    Per sample: with probability 0.5 a random affine (MONAI's ``AffineTransform``: rotation up to
    10 degrees in plane, zoom of each axis by up to 10 %, shift by up to 5 % of the side; zeros
    outside), with 0.3 a contrast gamma in [0.8, 1.25], with 0.3 Gaussian noise (sigma up to 0.02),
    and with 0.5 a left-right flip (``flip``). The batch arrives normalised by the encoder's mean and
    std; each step is defined on the [0, 1] intensities (as MONAI's per-sample chain did), and run on
    the normalised values where it commutes with the normalisation. 3D volumes rotate in the slice
    plane only. One batched call costs a fraction of the per-sample chain, so it hides behind the
    training step. Random parameters come from the object's own generator (``set_random_state``),
    so seeded runs repeat exactly.
    """

    def __init__(
        self,
        pre: Preprocessing,
        flip: bool = True,
        rotate_deg: float = 10.0,
        zoom: float = 0.1,
        shift: float = 0.05,
        seed: int = 0,
        color_jitter: float = 0.0,
        cutout: float = 0.0,
        gamma: tuple[float, float] = (0.8, 1.25),
        noise: float = 0.02,
    ):
        self.pre, self.flip, self.color_jitter = pre, flip, float(color_jitter)
        self.rotate, self.zoom, self.shift = np.deg2rad(rotate_deg), zoom, shift
        self.cutout, self.gamma, self.noise = float(cutout), tuple(gamma), float(noise)
        self.warp = AffineTransform(normalized=False, zero_centered=True, align_corners=False, padding_mode="zeros")
        self.set_random_state(seed)

    def stronger(self, seed: int) -> BatchAugment:
        """The strong view of semi-supervised consistency training (FixMatch's, in kind): rotations up to 30
        degrees, zoom by up to 25 %, shifts up to 12.5 %, gamma in [0.5, 2], noise up to 0.05, twice the
        colour jitter, and a cut-out square (side up to half the image) filled with mid-grey."""
        return BatchAugment(
            self.pre, self.flip, 30.0, 0.25, 0.125, seed, min(0.5, 2 * self.color_jitter), 0.5, (0.5, 2.0), 0.05
        )

    def set_random_state(self, seed: int) -> BatchAugment:
        self.R = torch.Generator().manual_seed(int(seed))
        self._device_R: dict[str, torch.Generator] = {}
        return self

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of the per-pixel noise: the CPU one on a CPU; on another device one of its own,
        seeded from it at first use (the noise is drawn where the batch is, not copied there)."""
        if device.type == "cpu":
            return self.R
        if str(device) not in self._device_R:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.R))
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
        """The augmented batch (a new tensor: ``x`` itself is not changed). Each step touches only the samples
        drawn for it, on the normalised values where it commutes with the per-channel normalisation (warp,
        flip, noise and cut-out, with their constants normalised), in [0, 1] intensities where it does not
        (contrast over a sample's own range, colour jitter): no pass over the whole batch converts it."""
        n, dims = x.shape[0], x.ndim - 2
        view = (1, -1) + (1,) * dims
        mean = torch.as_tensor(self.pre.mean, dtype=x.dtype, device=x.device).view(view)
        std = torch.as_tensor(self.pre.std, dtype=x.dtype, device=x.device).view(view)
        black = -mean / std  # intensity 0 (outside the warped image), normalised
        x = x.clone()
        idx = self._chosen(n, 0.5, x.device)
        if len(idx):  # warping x - black with zeros outside = warping the [0, 1] image, normalised
            affine = self.affines(len(idx), dims, x.shape[-1]).to(x.device)
            x[idx] = self.warp((x[idx] - black).contiguous(), affine) + black
        idx = self._chosen(n, 0.3, x.device)
        if len(idx):  # contrast: MONAI's RandAdjustContrast, per sample over its own range
            part = x[idx] * std + mean
            flat = part.reshape(len(idx), -1)
            shape = (len(idx),) + (1,) * (dims + 1)
            lo, hi = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
            span = hi - lo + 1e-7
            gamma = self._uniform(len(idx), low=self.gamma[0], high=self.gamma[1]).to(x.device).view(shape)
            x[idx] = (((part - lo) / span).clamp_min(0) ** gamma * span + lo - mean) / std
        idx = self._chosen(n, 0.3, x.device)
        if len(idx):  # noise, the same in every channel of the [0, 1] image (as on the one channel before the repeat)
            sigma = self._uniform(len(idx), low=0.0, high=self.noise).view((len(idx),) + (1,) * (dims + 1))
            noise = torch.randn((len(idx), 1) + x.shape[2:], generator=self._generator(x.device), device=x.device)
            x[idx] += sigma.to(x.device) / std * noise
        if self.color_jitter > 0 and x.shape[1] == 3:
            idx = self._chosen(n, 0.8, x.device)
            if len(idx):
                x[idx] = (self.jitter((x[idx] * std + mean).clamp(0, 1)) - mean) / std
        if self.flip:
            idx = self._chosen(n, 0.5, x.device)
            if len(idx):
                x[idx] = x[idx].flip(-1)
        if self.cutout > 0:  # one square per sample, mid-grey, side up to cutout * the image's side
            size = x.shape[-1]
            grey = ((0.5 - mean) / std).view(-1, *(1,) * dims)
            for i in range(n):
                side = max(1, int(float(self._uniform(1, low=0.0, high=self.cutout)) * size))
                corner = [int(v) for v in torch.randint(0, size - side + 1, (dims,), generator=self.R)]
                region = (i, slice(None)) + tuple(slice(c, c + side) for c in corner)
                x[region] = grey
        return x

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
        grey = (
            x
            * torch.as_tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view((1, 3) + (1,) * (x.ndim - 2))
        ).sum(1, keepdim=True)
        x = (x - grey) * factor(2 * j) + grey
        yiq = torch.as_tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype, device=x.device
        )
        angle = (self._uniform(m) * np.pi * j).to(x.device, x.dtype)
        rot = torch.zeros(m, 3, 3, dtype=x.dtype, device=x.device)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, angle.cos(), angle.cos()
        rot[:, 1, 2], rot[:, 2, 1] = -angle.sin(), angle.sin()
        turn = torch.linalg.inv(yiq) @ rot @ yiq  # (m, 3, 3): hue rotation in RGB
        x = torch.einsum("mij,mj...->mi...", turn, x)
        gain = (1 + self._uniform(m, 3) * j / 2).to(x.device, x.dtype).view((m, 3) + (1,) * (x.ndim - 2))
        return (x * gain).clamp(0, 1)


__all__ = ["BatchAugment"]
