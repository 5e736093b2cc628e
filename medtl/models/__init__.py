"""Encoders (timm architectures with ImageNet weights) and their preprocessing records."""

from medtl.models._registry import EncoderSpec, get_encoder_spec, list_encoders, register_encoder
from medtl.models.encoders import (
    Preprocessing,
    WeightsError,
    cam_layer_name,
    create_encoder,
    load_state_dict_file,
    resolve_preprocessing,
)
from medtl.models.volumetric import is_volume_model

__all__ = ["create_encoder", "resolve_preprocessing", "Preprocessing", "WeightsError", "list_encoders",
           "register_encoder", "get_encoder_spec", "EncoderSpec", "cam_layer_name", "load_state_dict_file",
           "is_volume_model"]
