"""Encoders (timm architectures with ImageNet weights) and their preprocessing records."""

from medtl.errors import WeightsError  # (re-exported: where users of medtl.models look for it)
from medtl.models._registry import EncoderSpec, get_encoder_spec, list_encoders, register_encoder
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
    "cam_layer_name",
    "load_state_dict_file",
    "is_volume_model",
    "ALL",
    "encoder_groups",
    "encoder_modules",
    "head_parameters",
    "set_trainable",
]
