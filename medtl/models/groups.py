"""Layer groups of an encoder and which of them train: what training and the saliency sanity checks share.

Groups come from timm's coarse ``group_matcher`` (stem, each stage of blocks; the head apart), so
"partial", "gradual" unfreezing, layer-wise learning-rate decay and cascading randomisation work
the same for every encoder, the MONAI 3D ResNets included (they implement the same interface).
"""

from __future__ import annotations

import torch
from timm.models import group_parameters

ALL = -1  # "every encoder layer group", for set_trainable and Stage.trainable


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The classification head's parameters."""
    return list(model.get_classifier().parameters())


def encoder_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Encoder parameters in layer groups, bottom (stem) to top, from timm's coarse group matcher."""
    head = set(map(id, head_parameters(model)))
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    out = []
    for _, names in sorted(groups.items()):
        params = [named[n] for n in names if id(named[n]) not in head]
        if params:
            out.append(params)
    return out


def encoder_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module of the encoder (the model less its head)."""
    head = set(map(id, model.get_classifier().modules()))
    return [m for m in model.modules() if id(m) not in head and m is not model]


def set_trainable(model: torch.nn.Module, trainable: int | bool) -> None:
    """Train the head and the top ``trainable`` encoder groups (ALL or True: every group); freeze the rest."""
    groups = encoder_groups(model)
    if trainable is True or trainable == ALL:
        k = len(groups)
    else:
        k = min(int(trainable), len(groups))
    train = set(map(id, head_parameters(model)))
    for g in groups[len(groups) - k :] if k else []:
        train.update(map(id, g))
    for p in model.parameters():
        p.requires_grad_(id(p) in train)


__all__ = ["ALL", "head_parameters", "encoder_groups", "encoder_modules", "set_trainable"]
