"""The encoder registry: every encoder medtl can build, registered by name.

``register_encoder(EncoderSpec(...))`` adds one; it returns the spec, so a module can keep it. As a
decorator, ``@register_encoder`` takes a function that returns an ``EncoderSpec`` and registers
what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medtl.errors import look_up_option


@dataclass(frozen=True)
class EncoderSpec:
    """What medtl knows about one encoder family member."""

    name: str  # medtl's name for it ("efficientnet_lite0")
    timm_name: str  # the timm architecture built for it
    description: str  # one line for `medtl encoders` and error messages
    offline_weights: Callable[[], object] | None = None  # returns (path, sha256 or prefix) of bundled weights
    cam_layer: str | None = None  # module whose output Grad-CAM uses; None = the last feature stage
    spatial_dims: int = 2  # 2: a timm image encoder; 3: a MONAI volume CNN (medtl.models.volumetric)
    source: str = "timm"  # who builds it: "timm", "torchvision" (medtl.models.tvision) or "monai"


_ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec | Callable[[], EncoderSpec]) -> EncoderSpec:
    """Register an encoder by its spec, or (used as a decorator) by a function returning its spec."""
    if callable(spec) and not isinstance(spec, EncoderSpec):
        spec = spec()
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"register_encoder needs an EncoderSpec, got {type(spec).__name__}")
    if spec.name in _ENCODERS:
        raise ValueError(f"encoder {spec.name!r} registered twice")
    _ENCODERS[spec.name] = spec
    return spec


def get_encoder_spec(name: str) -> EncoderSpec:
    return _ENCODERS[look_up_option(name, _ENCODERS, "encoder")]


def list_encoders() -> list[str]:
    return sorted(_ENCODERS)
