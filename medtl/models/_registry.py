"""The encoder registry: every encoder medtl can build, registered by name, and the open names it also takes.

``register_encoder(EncoderSpec(...))`` adds one; it returns the spec, so a module can keep it. As a
decorator, ``@register_encoder`` takes a function that returns an ``EncoderSpec`` and registers
what it returns.

Besides the registered names, :func:`get_encoder_spec` reads an open name ``SOURCE:REF`` (timm's own
``hf-hub:`` and ``local-dir:`` included), so any timm or torchvision model, a Hugging Face repository or
a local folder, and the medical foundation encoders of TorchXRayVision, open_clip and transformers can
be used without registering them first. This module imports no torch: ``medtl encoders`` lists the
registry at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medtl.errors import ConfigError, look_up_option


@dataclass(frozen=True)
class EncoderSpec:
    """What medtl knows about one encoder family member."""

    name: str  # medtl's name for it ("efficientnet_lite0", or an open name "timm:convnext_small.dinov2")
    timm_name: str  # the timm architecture built for it ("" when timm does not build it)
    description: str  # one line for `medtl encoders` and error messages
    offline_weights: Callable[[], object] | None = None  # returns (path, sha256 or prefix) of bundled weights
    cam_layer: str | None = None  # module whose output Grad-CAM uses; None = the last feature stage
    spatial_dims: int = 2  # 2: an image encoder; 3: a MONAI volume CNN (medtl.models.volumetric)
    # who builds it: "timm", "hf-hub" / "local-dir" (a timm model from a Hugging Face repository or a folder),
    # "torchvision" (medtl.models.tvision), "monai", or a foundation library: "xrv", "open_clip", "transformers"
    source: str = "timm"
    ref: str = ""  # what the source builds: a repository id, a folder, a torchvision or xrv weights name
    hub_id: str = ""  # the Hugging Face repository its weights come from (timm's default for the architecture)


# open names: SOURCE:REF -> what REF is (for the error listing them)
SOURCES = {
    "timm": "a timm model name, with its weight tag (timm:convnext_small.dinov2)",
    "hf-hub": "a timm model on the Hugging Face hub (hf-hub:timm/vit_small_patch16_224.augreg_in21k)",
    "local-dir": "a folder with a timm config.json and its weights (local-dir:/models/my_vit)",
    "tv": "a torchvision classification model name (tv:resnet101)",
    "xrv": "TorchXRayVision's DenseNet weights name (xrv:densenet121-res224-all)",
    "open_clip": "an open_clip model's image tower: ARCH[:TAG], hf-hub:REPO or a folder "
    "(open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)",
    "transformers": "a Hugging Face transformers vision model: REPO or a folder (transformers:microsoft/rad-dino)",
}

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


def open_spec(name: str) -> EncoderSpec:
    """The spec of an open name ``SOURCE:REF`` (see ``SOURCES``); a ConfigError names the sources."""
    source, sep, ref = name.partition(":")
    if not sep or not ref or source not in SOURCES:
        raise ConfigError(
            None,
            f"unknown encoder {name!r}",
            "a registered name (medtl encoders) or SOURCE:REF, SOURCE one of "
            + "; ".join(f"{k}: {v}" for k, v in SOURCES.items()),
        )
    if source == "tv":
        return EncoderSpec(name, "", f"torchvision {ref}", source="torchvision", ref=ref)
    timm_name = ref if source == "timm" else ""
    hub_id = ref if source == "hf-hub" else f"timm/{ref}" if source == "timm" and "." in ref else ""
    return EncoderSpec(name, timm_name, f"{source} {ref}", source=source, ref=ref, hub_id=hub_id)


def get_encoder_spec(name: str) -> EncoderSpec:
    """A registered encoder's spec, or an open name's (``timm:NAME``, ``hf-hub:REPO``, ``xrv:WEIGHTS`` ...)."""
    if name in _ENCODERS:
        return _ENCODERS[name]
    if ":" in name:
        return open_spec(name)
    return _ENCODERS[look_up_option(name, _ENCODERS, "encoder")]


def list_encoders() -> list[str]:
    return sorted(_ENCODERS)
