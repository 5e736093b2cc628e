"""Medical and general foundation encoders built by their own libraries, behind timm's classifier interface.

* **TorchXRayVision** (``xrv:WEIGHTS``, ``xrv_densenet121``): its chest X-ray DenseNets, fed as its authors
  define: 1 channel, 224 px, intensities scaled to [-1024, 1024] (recorded as mean 0.5, std 1/2048 after
  medtl's scaling to [0, 1]). Its weights are read by its own loader from its cache.
* **open_clip** (``open_clip:ARCH[:TAG]``, ``open_clip:hf-hub:REPO``, ``open_clip:/folder``, ``biomedclip``): the
  image tower alone (the text tower is neither built nor downloaded), its embedding as the features, the
  mean, std, size and interpolation of the model's ``preprocess_cfg``.
* **transformers** (``transformers:REPO`` or a folder, ``rad_dino``): a vision backbone (DINOv2, ViT, ...) by
  ``AutoModel``, its pooled class token as the features, preprocessing from its ``preprocessor_config.json``.

Each records its architecture in ``pretrained_cfg["medtl_architecture"]`` (saved with a fine-tuned model), so a
run rebuilds without the hub. Vision transformers have no feature map for Grad-CAM: the patch tokens entering
the last block are laid out as their grid and passed through ``token_grid`` (an identity), Grad-CAM's layer —
the usual substitute (Chefer et al. 2021 discuss the alternatives; attention rollout is not used).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medtl.errors import WeightsError
from medtl.models.classifier import ClassifierAdapter

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


class TokenGridHook:
    """A forward pre-hook of a transformer block: its input's patch tokens, as a (N, C, side, side) grid, go
    through ``grid`` (an identity Grad-CAM can hook) and back. A class, not a closure, so a deep copy of the
    model hooks its own copy of ``grid``."""

    def __init__(self, grid: nn.Module, prefix: int):
        self.grid, self.prefix = grid, prefix

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        n, length, c = x.shape
        side = round((length - self.prefix) ** 0.5)
        if side * side != length - self.prefix:
            return None
        grid = self.grid(x[:, self.prefix :].transpose(1, 2).reshape(n, c, side, side))
        x = torch.cat([x[:, : self.prefix], grid.flatten(2).transpose(1, 2)], dim=1)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}


def attach_token_grid(model: nn.Module, block: nn.Module, prefix: int) -> None:
    """Give ``model`` a ``token_grid`` module fed the patch tokens entering ``block`` (its last transformer
    block, after ``prefix`` class/register tokens), and make it the model's Grad-CAM layer."""
    model.token_grid = nn.Identity()
    block.register_forward_pre_hook(TokenGridHook(model.token_grid, prefix), with_kwargs=True)
    model.pretrained_cfg["medtl_cam_layer"] = "token_grid"


def timm_vit_grid(model: nn.Module) -> None:
    """A timm vision transformer (``blocks`` and ``num_prefix_tokens``) gets its token grid; others keep their
    last feature map."""
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens") and len(model.blocks):
        attach_token_grid(model, model.blocks[-1], int(model.num_prefix_tokens))


class XrvEncoder(ClassifierAdapter):
    """A TorchXRayVision DenseNet (``net``) without its 18-finding classifier; ``fc`` is medtl's head."""

    def __init__(self, weights: str, num_classes: int = 0, drop_rate: float = 0.0, pretrained: bool = True):
        super().__init__()
        import torchxrayvision as xrv

        from medtl.models.hub import xrv_file

        if weights not in xrv.models.model_urls or "densenet" not in weights:
            options = [k for k in xrv.models.model_urls if "densenet" in k]
            raise WeightsError(f"xrv:{weights}: not a TorchXRayVision DenseNet weights name (one of {options})")
        if pretrained:
            path = xrv_file(weights, xrv.models.model_urls[weights]["weights_url"])
            self.net = xrv.models.DenseNet(weights=weights, cache_dir=str(path.parent))  # its own loader
            self.net.op_threshs = None  # its calibration of its own 18 outputs: not medtl's head
        else:
            self.net = xrv.models.DenseNet(weights=None)
        self.num_features = self.net.classifier.in_features
        self.net.classifier = nn.Identity()
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes)
        size = int(xrv.models.model_urls[weights].get("input_resolution", 224))
        self.pretrained_cfg = {
            "architecture": f"torchxrayvision.models.DenseNet({weights})",
            "input_size": (1, size, size),
            "in_chans": 1,
            "mean": (0.5,),
            "std": (1 / 2048,),  # (x - 0.5) * 2048: [0, 1] to xrv's [-1024, 1024]
            "interpolation": "bilinear",
            "first_conv": "net.features.conv0",
            "spatial_dims": 2,
            "medtl_architecture": {"xrv": weights},
        }
        self.feature_info = [{"module": "net.features", "num_chs": self.num_features}]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.net.features(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^net\.features\.(?:conv0|norm0)\.",
            "blocks": r"^net\.features\.(?:denseblock|transition)(\d+)\.",
        }


def open_clip_config(ref: str, need_weights: bool = True) -> tuple[dict, Path | None]:
    """(open_clip's config {"model_cfg", "preprocess_cfg"}, the weight file or None) of ``ref``: a folder,
    ``hf-hub:REPO`` (from the cache) or a built-in ``ARCH[:TAG]``."""
    from medtl.models.hub import HF_WEIGHTS, hf_cached, hf_folder, hf_weights_file

    ref = ref.removeprefix("local-dir:")
    if ref.startswith("hf-hub:") or Path(ref).is_dir():
        repo = ref.removeprefix("hf-hub:")
        folder = hf_folder(repo, "open_clip", need_weights) if ref.startswith("hf-hub:") else Path(ref)
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise WeightsError(f"{folder}: no open_clip_config.json (an open_clip model folder has one)")
        weights = [folder / f for f in HF_WEIGHTS["open_clip"] if (folder / f).is_file()]
        return json.loads(config.read_text()), (weights[0] if weights else None)
    import open_clip

    arch, _, tag = ref.partition(":")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise WeightsError(f"open_clip:{ref}: {arch!r} is not an open_clip architecture")
    pre = dict(open_clip.get_pretrained_cfg(arch, tag)) if tag else {}
    if tag and not pre:
        raise WeightsError(f"open_clip:{ref}: {arch} has no weights tagged {tag!r}")
    weights = None
    if pre.get("hf_hub"):
        parts = pre["hf_hub"].strip("/").split("/")  # "org/repo/" or "org/repo/file"
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        weights = hf_cached(repo, filename) if filename else None
        weights = weights or (hf_weights_file(repo, "open_clip") if need_weights else None)
    keys = ("mean", "std", "interpolation", "resize_mode", "size")
    return {"model_cfg": model_cfg, "preprocess_cfg": {k: pre[k] for k in keys if k in pre}}, weights


class OpenClipEncoder(ClassifierAdapter):
    """An open_clip model's image tower (``net``); its embedding is the feature vector."""

    def __init__(self, config: dict, num_classes: int = 0, drop_rate: float = 0.0, weights: Path | None = None):
        super().__init__()
        from open_clip.model import _build_vision_tower

        model_cfg, pre = config["model_cfg"], config.get("preprocess_cfg", {})
        self.net = _build_vision_tower(
            model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=model_cfg.get("quick_gelu", False)
        )
        if weights is not None:
            self._load(weights)
        self.num_features = int(model_cfg["embed_dim"])
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes)
        size = int(model_cfg["vision_cfg"].get("image_size", 224))
        self.pretrained_cfg = {
            "architecture": f"open_clip image tower ({type(self.net).__name__})",
            "input_size": (3, size, size),
            "mean": tuple(pre.get("mean", OPENAI_MEAN)),
            "std": tuple(pre.get("std", OPENAI_STD)),
            "interpolation": pre.get("interpolation", "bicubic"),
            "fixed_input_size": True,
            "spatial_dims": 2,
            "medtl_architecture": {"open_clip": config},
        }
        trunk = getattr(self.net, "trunk", None)
        if trunk is not None and hasattr(trunk, "blocks"):
            self.pretrained_cfg["first_conv"] = "net.trunk.patch_embed.proj"
            attach_token_grid(self, trunk.blocks[-1], int(getattr(trunk, "num_prefix_tokens", 1)))
        elif hasattr(self.net, "transformer"):
            self.pretrained_cfg["first_conv"] = "net.conv1"
            attach_token_grid(self, self.net.transformer.resblocks[-1], 1)

    def _load(self, path: Path) -> None:
        from medtl.models.weights import file_sha256, load_state_dict_file

        sd = {k.removeprefix("visual."): v for k, v in load_state_dict_file(path).items() if k.startswith("visual.")}
        try:
            self.net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise WeightsError(
                f"{path}: does not fit the open_clip image tower: {str(e).splitlines()[-1][:200]}"
            ) from None
        self.weights_source = f"{path.name} (sha256 {file_sha256(path)[:12]})"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def group_matcher(self, coarse: bool = False) -> dict:
        if hasattr(self.net, "trunk"):
            return {
                "stem": r"^net\.trunk\.(?:cls_token|reg_token|pos_embed|patch_embed)",
                "blocks": r"^net\.trunk\.blocks\.(\d+)\.",
            }
        return {
            "stem": r"^net\.(?:conv1|class_embedding|positional_embedding|ln_pre)",
            "blocks": r"^net\.transformer\.resblocks\.(\d+)\.",
        }


def _hf_preprocessing(folder: Path | None, config) -> dict:
    """mean, std, size and interpolation from a transformers model folder's ``preprocessor_config.json``."""
    path = folder / "preprocessor_config.json" if folder else None
    pre = json.loads(path.read_text()) if path and path.is_file() else {}
    size = pre.get("crop_size") or pre.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    return {
        "mean": tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
        "std": tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        "size": int(side or getattr(config, "image_size", 224)),
        "interpolation": PIL_RESAMPLE.get(pre.get("resample", 3), "bicubic"),
    }


class HFVisionEncoder(ClassifierAdapter):
    """A Hugging Face transformers vision backbone (``net``); its pooled class token is the feature vector."""

    def __init__(
        self,
        ref: str,
        num_classes: int = 0,
        drop_rate: float = 0.0,
        architecture: dict | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        import transformers

        from medtl.models.hub import hf_folder

        transformers.utils.logging.disable_progress_bar()  # one bar per load, in the user's terminal otherwise
        if architecture is not None:  # a saved run: the architecture alone, its weights come from the run
            config = transformers.AutoConfig.for_model(**architecture["config"])
            self.net, pre = transformers.AutoModel.from_config(config), architecture["preprocess"]
        else:
            folder = Path(ref) if Path(ref).is_dir() else hf_folder(ref, "transformers", need_weights=pretrained)
            try:
                if pretrained:
                    self.net = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
                else:
                    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
                    self.net = transformers.AutoModel.from_config(config)
            except (OSError, ValueError) as e:
                raise WeightsError(f"transformers:{ref}: cannot be loaded ({str(e).splitlines()[0][:200]})") from None
            pre = _hf_preprocessing(folder, self.net.config)
        cfg = self.net.config
        self.num_features = int(cfg.hidden_size)
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes)
        self.pretrained_cfg = {
            "architecture": f"transformers {type(self.net).__name__}",
            "input_size": (3, pre["size"], pre["size"]),
            "mean": pre["mean"],
            "std": pre["std"],
            "interpolation": pre["interpolation"],
            "first_conv": "net.embeddings.patch_embeddings.projection",
            "spatial_dims": 2,
            "medtl_architecture": {"transformers": {"config": cfg.to_dict(), "preprocess": pre}},
        }
        layers = getattr(getattr(self.net, "encoder", None), "layer", None)
        if layers is not None and len(layers):
            attach_token_grid(self, layers[-1], 1 + int(getattr(cfg, "num_register_tokens", 0) or 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^net\.embeddings\.", "blocks": r"^net\.encoder\.(?:layer|layers|stages)\.(\d+)\."}


__all__ = [
    "XrvEncoder",
    "OpenClipEncoder",
    "HFVisionEncoder",
    "open_clip_config",
    "attach_token_grid",
    "timm_vit_grid",
    "TokenGridHook",
]
