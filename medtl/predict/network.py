"""Exported networks (ONNX, TorchScript) as callables: an image batch in, (logits, pooled features) out;
the same form :class:`LogitsAndFeatures` gives a PyTorch model, so prediction runs either the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtl.extras import require
from medtl.run import RunDir

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


class LogitsAndFeatures(nn.Module):
    """The network as exported: an (N, C, H, W) batch in; (logits, pooled encoder features) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(x)  # type: ignore[operator]  # a timm method; torch types Module attributes Tensor | Module
        return self.model.forward_head(fmap), self.model.forward_head(fmap, pre_logits=True)  # type: ignore[operator]  # as above


class ExportedNetwork:
    """An exported network run by ONNX Runtime (on a GPU where asked and available) or TorchScript: an image
    batch in, (logits, features) out as CPU float32 tensors."""

    def __init__(self, path: Path, fmt: str, device: torch.device | None = None):
        self.format, self.device = fmt, device or torch.device("cpu")
        if fmt == "onnx":
            ort = require("export", "onnxruntime", "an ONNX package")  # imported on use: only ONNX packages need it

            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(path), providers=providers)
        else:
            self.module = torch.jit.load(str(path), map_location=device).eval()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float().contiguous()
        if self.format == "onnx":
            z, f = self.session.run(None, {"image": x.cpu().numpy()})
            return torch.from_numpy(z), torch.from_numpy(f)
        with torch.no_grad():
            z, f = self.module(x.to(self.device))
        return z.float().cpu(), f.float().cpu()


def load_network(folder: str | Path, fmt: str | None = None, device: torch.device | None = None) -> ExportedNetwork:
    """The exported network of a package folder (its format from ``export.json`` unless given)."""
    folder = Path(folder)
    fmt = fmt or RunDir(folder).read_json(RunDir.EXPORT)["format"]
    return ExportedNetwork(folder / FORMATS[fmt], fmt, device)


def max_probability_difference(network: ExportedNetwork, reference: nn.Module, x: torch.Tensor) -> float:
    """The largest absolute difference between the softmax of ``network``'s and ``reference``'s logits on ``x``."""
    with torch.no_grad():
        expected = reference(x)[0].softmax(dim=1)
    got = network(x)[0].softmax(dim=1)
    return float(np.abs((got - expected).numpy()).max())


__all__ = ["ExportedNetwork", "LogitsAndFeatures", "load_network", "max_probability_difference", "FORMATS"]
