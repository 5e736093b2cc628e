"""Reading weight files: safely (``weights_only``; safetensors where given), checked by sha256, renamed by order."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from medtl.errors import WeightsError


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.bin weight file safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot be read as weights ({type(e).__name__}: {str(e)[:160]})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys one-to-one, in order, checking every shape."""
    if len(source) != len(target):
        raise WeightsError(f"{what}: {len(source)} tensors, the architecture has {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(f"{what}: tensor {sk} has shape {tuple(sv.shape)}, {tk} needs {tuple(tv.shape)}")
        out[tk] = sv
    return out


__all__ = ["file_sha256", "load_state_dict_file", "map_state_dict_by_order"]
