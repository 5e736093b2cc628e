"""Encoders (timm, torchvision, MONAI and foundation-model networks with pretrained weights) and their
preprocessing records.

The registry (:mod:`medtl.models._registry`, :mod:`medtl.models.catalog`) and the weight look-up
(:mod:`medtl.models.hub`) import no torch; everything else loads on first use, so ``medtl encoders`` answers at
once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medtl.errors import WeightsError  # (re-exported: where users of medtl.models look for it)
from medtl.models import catalog  # noqa: F401  -- registers the encoders
from medtl.models._registry import SOURCES, EncoderSpec, get_encoder_spec, list_encoders, register_encoder

if TYPE_CHECKING:
    from medtl.models.encoders import (
        Preprocessing,
        cam_layer_name,
        check_encoder,
        create_encoder,
        create_model,
        load_state_dict_file,
        resolve_preprocessing,
    )
    from medtl.models.groups import ALL, encoder_groups, encoder_modules, head_parameters, set_trainable
    from medtl.models.volumetric import is_volume_model

_LAZY = {
    **dict.fromkeys(
        [
            "Preprocessing",
            "cam_layer_name",
            "check_encoder",
            "create_encoder",
            "create_model",
            "load_state_dict_file",
            "resolve_preprocessing",
        ],
        "medtl.models.encoders",
    ),
    **dict.fromkeys(
        ["ALL", "encoder_groups", "encoder_modules", "head_parameters", "set_trainable"], "medtl.models.groups"
    ),
    "is_volume_model": "medtl.models.volumetric",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medtl.models' has no attribute {name!r}")


__all__ = [
    "create_encoder",
    "create_model",
    "check_encoder",
    "resolve_preprocessing",
    "Preprocessing",
    "WeightsError",
    "list_encoders",
    "register_encoder",
    "get_encoder_spec",
    "EncoderSpec",
    "SOURCES",
    "cam_layer_name",
    "load_state_dict_file",
    "is_volume_model",
    "ALL",
    "encoder_groups",
    "encoder_modules",
    "head_parameters",
    "set_trainable",
]
