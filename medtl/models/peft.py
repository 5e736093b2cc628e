"""Parameter-efficient fine-tuning: LoRA on an encoder's convolutions and linear layers, BitFit's selection.

LoRA (Hu et al. 2021) adds to a frozen weight ``W`` a trainable low-rank update ``B @ A`` (rank ``r``,
``B`` starting at zero, so training starts from the pretrained network). It is put on the layers with
:func:`torch.nn.utils.parametrize`, so the layers themselves are unchanged (timm's TF-"same" padding
convolutions included), and :func:`merge_lora` folds the update into ``W`` after training: the saved
model is the plain encoder, with no adapter code needed to load or run it. Depthwise convolutions
(``groups`` > 1) have few weights and are left alone.

BitFit (Ben Zaken et al. 2022) trains only bias terms; a convolutional network whose convolutions have
no bias (BatchNorm follows them) keeps its biases in the normalisation layers, so here BitFit trains
the bias terms and the normalisation layers' scales and shifts (:func:`is_bitfit_parameter`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize


class LoRAUpdate(nn.Module):
    """The parametrisation ``W -> W + (alpha / r) * B @ A`` of a conv or linear weight (shape (out, in, *k))."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None):
        super().__init__()
        out_ch, in_ch, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
        self.shape = tuple(weight.shape)
        self.lora_a = nn.Parameter(torch.empty(rank, in_ch * math.prod(kernel), dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_ch, rank, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as LoRA's reference code
        self.scale = (alpha if alpha is not None else rank) / rank

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a).reshape(self.shape) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``module`` LoRA adapts: linear layers and convolutions that are not depthwise."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)
    ]


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None) -> int:
    """Put a LoRA update of ``rank`` on every layer of :func:`lora_layers` of the model's encoder (its head
    is trained directly); freeze the layers' own weights. Returns the number of LoRA parameters."""
    head = set(map(id, model.get_classifier().modules()))
    n = 0
    for _, layer in lora_layers(model):
        if id(layer) in head or parametrize.is_parametrized(layer, "weight"):
            continue
        update = LoRAUpdate(layer.weight.detach(), rank, alpha).to(layer.weight.device)
        parametrize.register_parametrization(layer, "weight", update)
        layer.parametrizations.weight.original.requires_grad_(False)
        n += update.lora_a.numel() + update.lora_b.numel()
    return n


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its layer's weight and remove the parametrisation (the model is the plain
    network again). Returns the number of layers merged."""
    merged = 0
    for _, m in list(model.named_modules()):
        if parametrize.is_parametrized(m, "weight") and any(
            isinstance(p, LoRAUpdate) for p in m.parametrizations.weight
        ):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            merged += 1
    return merged


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the plain network has it: a LoRA-adapted weight under its own name with the
    update folded in (what :func:`merge_lora` would leave), without the adapter's tensors."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            prefix = f"{name}." if name else ""
            for key in [k for k in state if k.startswith(f"{prefix}parametrizations.weight.")]:
                del state[key]
            state[f"{prefix}weight"] = m.weight.detach()
    return state


def is_lora_parameter(name: str) -> bool:
    return ".lora_a" in name or ".lora_b" in name


def is_bitfit_parameter(model: nn.Module, name: str) -> bool:
    """Whether BitFit trains the parameter ``name``: a bias, or a normalisation layer's scale or shift."""
    if name.endswith("bias"):
        return True
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm))


__all__ = [
    "LoRAUpdate",
    "add_lora",
    "merge_lora",
    "plain_state_dict",
    "lora_layers",
    "is_lora_parameter",
    "is_bitfit_parameter",
]
