"""Building an encoder's network for its source, and loading its weights offline first.

One function per source (timm and its ``hf-hub:`` / ``local-dir:`` models, torchvision, TorchXRayVision,
open_clip, transformers); :func:`build_network` picks it. Each returns the network with timm's interface and a
line saying where its weights came from (kept in ``pretrained_cfg["weights_source"]`` and the model card).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

from medtl.errors import WeightsError
from medtl.models._registry import EncoderSpec
from medtl.models.catalog import KNOWN_SHA256
from medtl.models.foundation import HFVisionEncoder, OpenClipEncoder, XrvEncoder, timm_vit_grid
from medtl.models.hub import hf_folder, hf_weights_file, library_installed, torch_hub_dir, torchvision_file
from medtl.models.tvision import TorchvisionEncoder, imagenet_weights, load_torchvision_file
from medtl.models.weights import file_sha256, load_state_dict_file, map_state_dict_by_order

SCRATCH = "random initialisation"
EXTRA = {"xrv": "torchxrayvision", "open_clip": "open_clip_torch", "transformers": "transformers"}


def build_network(
    spec: EncoderSpec,
    pretrained: bool,
    weights_file: str | Path | None,
    drop_rate: float,
    input_size: int | None = None,
    architecture: dict | None = None,
) -> tuple[torch.nn.Module, str]:
    """(the network ``spec`` names with its weights or none, where the weights came from)."""
    if not library_installed(spec.source):
        raise WeightsError(
            f"encoder {spec.name!r} is built by {EXTRA[spec.source]}, not installed here: "
            f"pip install 'medtl[foundation]' (or pip install {EXTRA[spec.source]})"
        )
    pretrained = pretrained and architecture is None  # a saved model: its weights come from the run
    if spec.source == "torchvision":
        model = TorchvisionEncoder(spec.ref or spec.name, drop_rate=drop_rate)
        return model, _load_torchvision(model, spec, weights_file) if pretrained else SCRATCH
    if spec.source == "xrv":
        model = XrvEncoder(spec.ref, drop_rate=drop_rate, pretrained=pretrained and weights_file is None)
        if weights_file is not None and pretrained:
            return model, _load_into(model.net, weights_file, spec.name, skip=("classifier.", "op_threshs"))
        return model, model.pretrained_cfg["architecture"] if pretrained else SCRATCH
    if spec.source == "open_clip":
        return _build_open_clip(spec, pretrained, weights_file, drop_rate, architecture)
    if spec.source == "transformers":
        arch = (architecture or {}).get("transformers")
        model = HFVisionEncoder(spec.ref, drop_rate=drop_rate, architecture=arch, pretrained=pretrained)
        return model, f"transformers {spec.ref}" if pretrained else SCRATCH
    return _build_timm(spec, pretrained, weights_file, drop_rate, input_size, architecture)


def _build_open_clip(spec, pretrained, weights_file, drop_rate, architecture) -> tuple[torch.nn.Module, str]:
    from medtl.models.foundation import open_clip_config

    if architecture is not None:
        return OpenClipEncoder(architecture["open_clip"], drop_rate=drop_rate), SCRATCH
    config, found = open_clip_config(spec.ref, need_weights=pretrained and weights_file is None)
    path = Path(weights_file) if weights_file is not None else found
    model = OpenClipEncoder(config, drop_rate=drop_rate, weights=path if pretrained else None)
    return model, getattr(model, "weights_source", SCRATCH)


def _timm_kwargs(name: str, drop_rate: float, input_size: int | None) -> dict:
    """timm.create_model's arguments: a fixed-size model (a ViT) is built for ``input_size``."""
    kwargs: dict = {"drop_rate": drop_rate}
    cfg = timm.models.get_pretrained_cfg(name)
    native = cfg.input_size[-1] if cfg is not None else None
    if input_size and cfg is not None and cfg.fixed_input_size and input_size != native:
        kwargs["img_size"] = input_size
    return kwargs


def _build_timm(spec, pretrained, weights_file, drop_rate, input_size, architecture) -> tuple[torch.nn.Module, str]:
    if architecture is not None and "timm" in architecture:  # a saved hf-hub / local-dir model
        record = architecture["timm"]
        model = timm.create_model(record["name"], pretrained=False, drop_rate=drop_rate, **record["kwargs"])
        source = SCRATCH
    elif spec.source in ("hf-hub", "local-dir"):
        folder = Path(spec.ref) if spec.source == "local-dir" else None
        folder = folder or hf_folder(spec.ref, "timm", need_weights=pretrained and weights_file is None)
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{folder}: no config.json (a timm model folder has one)")
        load = pretrained and weights_file is None
        model = timm.create_model(f"local-dir:{folder}", pretrained=load, drop_rate=drop_rate)
        source = f"timm {spec.ref}" if load else SCRATCH
        model.pretrained_cfg = {**model.pretrained_cfg, "medtl_architecture": _timm_record(folder)}
    else:
        name = spec.timm_name or spec.ref
        kwargs = _timm_kwargs(name, drop_rate, input_size)
        model, source = _timm_with_weights(spec, name, kwargs, pretrained and weights_file is None)
        if "img_size" in kwargs:
            model.pretrained_cfg = {
                **model.pretrained_cfg,
                "medtl_architecture": {"timm": {"name": name, "kwargs": {"img_size": kwargs["img_size"]}}},
            }
    if pretrained and weights_file is not None:
        source = _load_timm_file(model, spec, weights_file)
    timm_vit_grid(model)
    return model, source


def _timm_record(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {"timm": {"name": config["architecture"], "kwargs": dict(config.get("model_args", {}))}}


def _timm_with_weights(spec: EncoderSpec, name: str, kwargs: dict, pretrained: bool) -> tuple[torch.nn.Module, str]:
    """A timm model by ``name``; with ``pretrained``: the bundled file, else timm's default weights from the
    Hugging Face cache (or torch's hub cache for timm's older url-only weights)."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), SCRATCH
    if spec.offline_weights is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        return model, _load_bundled(model, spec)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        raise WeightsError(f"timm has no architecture {name!r} (timm.list_models() lists them)")
    if cfg.hf_hub_id:
        path = hf_weights_file(cfg.hf_hub_id, "timm")
    elif cfg.url:
        path = torch_hub_dir() / cfg.url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise WeightsError(
                f"timm's weights for {name} are not on this machine: curl -L --create-dirs -o {path} {cfg.url}"
            )
    else:
        raise WeightsError(
            f"timm publishes no pretrained weights for {name!r}: pass --weights-file or pretrained false"
        )
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    return model, f"timm {name} ({path.name}, sha256 {file_sha256(path)[:12]})"


def _load_bundled(model: torch.nn.Module, spec: EncoderSpec) -> str:
    path, expected = spec.offline_weights()  # type: ignore[misc]  # returns (path, sha256 prefix)
    digest = file_sha256(path)
    full = KNOWN_SHA256.get(path.name)
    if (full and digest != full) or not digest.startswith(expected):
        raise WeightsError(
            f"{path}: sha256 {digest[:16]}... does not match the published weights "
            f"({(full or expected)[:16]}...); reinstall the package"
        )
    mapped = map_state_dict_by_order(load_state_dict_file(path), model.state_dict(), str(path))
    model.load_state_dict(mapped, strict=True)
    return f"{path.name} (sha256 {digest[:12]})"


def _load_timm_file(model: torch.nn.Module, spec: EncoderSpec, weights_file: str | Path) -> str:
    sd = load_state_dict_file(weights_file)
    head = {f"{model.pretrained_cfg.get('classifier', 'fc')}.{k}" for k in model.get_classifier().state_dict()}
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if unexpected or (missing and missing != head):  # an encoder-only file (no ImageNet head) is fine
        raise WeightsError(
            f"{weights_file}: does not fit {spec.timm_name or spec.name}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return _load_into(model, weights_file, spec.name, sd=sd, strict=not missing)


def _load_into(
    net: torch.nn.Module,
    weights_file: str | Path,
    what: str,
    skip: tuple[str, ...] = (),
    sd: dict | None = None,
    strict: bool = True,
) -> str:
    """Load a weight file into ``net`` (keys starting with ``skip`` left out), or a WeightsError naming it."""
    sd = {
        k: v
        for k, v in (sd if sd is not None else load_state_dict_file(weights_file)).items()
        if not k.startswith(skip)
    }
    try:
        net.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise WeightsError(f"{weights_file}: does not fit {what}: {str(e).splitlines()[-1][:200]}") from None
    return f"{Path(weights_file).name} (sha256 {file_sha256(Path(weights_file))[:12]})"


def _load_torchvision(model: TorchvisionEncoder, spec: EncoderSpec, weights_file: str | Path | None) -> str:
    """ImageNet weights of a torchvision encoder: ``weights_file`` (torchvision's layout, the file its
    ``weights=`` enum downloads), else torchvision's default file from torch's hub cache (checked by the
    sha256 prefix in its name)."""
    if weights_file is None:
        url = imagenet_weights(model.arch).url
        path = torchvision_file(url.rsplit("/", 1)[-1])
        digest = file_sha256(path)
        if not digest.startswith(path.stem.rsplit("-", 1)[-1]):
            raise WeightsError(
                f"{path}: sha256 {digest[:16]}... does not match torchvision's file name; fetch it again"
            )
        weights_file = path
    sd = load_state_dict_file(weights_file)
    try:
        load_torchvision_file(model, sd)
    except (ValueError, RuntimeError) as e:
        raise WeightsError(
            f"{weights_file}: does not fit {spec.name} (torchvision {model.arch}): {str(e).splitlines()[-1][:200]}"
        ) from None
    return f"{Path(weights_file).name} (sha256 {file_sha256(Path(weights_file))[:12]})"


__all__ = ["build_network", "SCRATCH"]
