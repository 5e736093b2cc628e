"""torchvision's ImageNet families behind the same interface as the timm encoders.

The adapter gives a torchvision classifier what medtl's training loop, checkpoints, layer groups
and Grad-CAM use from a timm model: ``forward_features`` / ``forward_head``, ``get_classifier`` /
``reset_classifier``, ``group_matcher`` (stem, each stage of blocks) and a ``pretrained_cfg``
preprocessing record (ImageNet mean and std, bilinear). The network keeps torchvision's own
parameter names under ``net.``, so torchvision's published weight files load as they are.

ViT-B/16 reads a grid of 14 x 14 patch tokens: its Grad-CAM layer (``token_grid``) is the input of
the last encoder block laid out as that grid, the usual choice for vision transformers (the class
token's own output has no gradient to the patch tokens at the last layer).
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from medtl.models.classifier import ClassifierAdapter

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# each family: (stem regex, blocks regex, Grad-CAM module, first convolution)
_DENSE = (
    r"^net\.features\.(?:conv0|norm0)\.",
    r"^net\.features\.(?:denseblock|transition)(\d+)\.",
    "net.features",
    "net.features.conv0",
)
_FAMILY_LAYOUT = {
    "resnet": (r"^net\.(?:conv1|bn1)\.", r"^net\.layer(\d+)\.", "net.layer4", "net.conv1"),
    "densenet": _DENSE,
    "efficientnet": (r"^net\.features\.0\.", r"^net\.features\.(\d+)\.", "net.features", "net.features.0.0"),
    # ConvNeXt: each downsampling layer (features.2, 4, 6) joins the stage after it, as in timm's grouping
    "convnext": (
        r"^net\.features\.0\.",
        [(r"^net\.features\.([1246])\.", None), (r"^net\.features\.([357])\.", (99999,))],
        "net.features",
        "net.features.0.0",
    ),
    "vit": (
        r"^net\.(?:conv_proj|class_token|encoder\.pos_embedding)",
        r"^net\.encoder\.layers\.encoder_layer_(\d+)\.",
        "token_grid",
        "net.conv_proj",
    ),
}
# torchvision builder name prefix -> family
_PREFIXES = {
    "resnet": "resnet",
    "resnext": "resnet",
    "wide_resnet": "resnet",
    "densenet": "densenet",
    "efficientnet_b": "efficientnet",
    "efficientnet_v2": "efficientnet",
    "convnext": "convnext",
    "vit_": "vit",
}


def family(name: str) -> tuple[str, str]:
    """(torchvision builder, family) of ``name``: "tv_resnet18" or a torchvision name ("resnet101"); a
    ValueError lists the families medtl adapts."""
    arch = name.removeprefix("tv_")
    for prefix, fam in _PREFIXES.items():
        if arch.startswith(prefix) and arch in torchvision.models.list_models(module=torchvision.models):
            return arch, fam
    raise ValueError(
        f"torchvision model {arch!r} is not one medtl adapts (ResNet/ResNeXt/Wide ResNet, DenseNet, EfficientNet, "
        "ConvNeXt, ViT); timm builds many more: timm:NAME"
    )


def _head_of(net: nn.Module) -> tuple[str, nn.Linear]:
    """(attribute path, Linear) of a torchvision classifier's final layer."""
    for path in ("fc", "classifier", "classifier.1", "classifier.2", "heads.head"):
        try:
            layer = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear):
            return path, layer
    raise TypeError(f"no final Linear layer found in {type(net).__name__}")


class TorchvisionEncoder(ClassifierAdapter):
    """A torchvision ImageNet classifier (``net``) with timm's classifier interface; ``fc`` is medtl's head."""

    def __init__(self, name: str, num_classes: int = 0, drop_rate: float = 0.0, weights=None):
        super().__init__()
        arch, self.family = family(name)
        self._stem, self._blocks, self._cam, first_conv = _FAMILY_LAYOUT[self.family]
        self.net = getattr(torchvision.models, arch)(weights=weights)
        self.arch = arch
        path, last = _head_of(self.net)
        self.num_features = last.in_features
        self.head_path = path  # torchvision's name of the ImageNet head (fc, classifier.1, heads.head, ...)
        # kept apart, not a submodule (it would train and be saved): the ImageNet head, for 1000 classes
        self.__dict__["imagenet_head"] = last
        parent, _, child = path.rpartition(".")
        setattr(self.net.get_submodule(parent) if parent else self.net, child, nn.Identity())
        self.token_grid = nn.Identity()  # ViT: the patch tokens entering the last block, as a (N, C, 14, 14) grid
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes)
        self.pretrained_cfg = {
            "architecture": f"torchvision.models.{arch}",
            "input_size": (3, 224, 224),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bilinear",
            "first_conv": first_conv,
            "spatial_dims": 2,
            "fixed_input_size": self.family == "vit",
        }
        self.feature_info = [{"module": self._cam, "num_chs": self.num_features}]

    # -- timm's interface -------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, h, w); for ViT the final tokens (N, 1 + h * w, C)."""
        n = self.net
        if self.family == "resnet":
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            return n.layer4(n.layer3(n.layer2(n.layer1(x))))
        if self.family == "densenet":
            return nn.functional.relu(n.features(x))
        if self.family == "vit":
            return self._vit_tokens(x)
        return n.features(x)  # EfficientNet, ConvNeXt

    def _vit_tokens(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._process_input(x)
        x = torch.cat([n.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        enc = n.encoder
        x = enc.dropout(x + enc.pos_embedding)
        layers = list(enc.layers)
        for layer in layers[:-1]:
            x = layer(x)
        side = round((x.shape[1] - 1) ** 0.5)
        grid = x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = self.token_grid(grid)
        x = torch.cat([x[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        return enc.ln(layers[-1](x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "vit":
            return x[:, 0]  # the class token
        x = x.mean(dim=(2, 3))
        if self.family == "convnext":  # its classifier starts with a LayerNorm over channels
            x = self.net.classifier(x[:, :, None, None]).flatten(1)
        return x

    def reset_classifier(self, num_classes: int) -> None:
        """A new head of ``num_classes`` (0: pooled features); 1000 keeps the ImageNet head."""
        super().reset_classifier(num_classes)
        if num_classes == self.imagenet_head.out_features:  # a copy, on the network's device
            self.fc = copy.deepcopy(self.imagenet_head).to(next(self.net.parameters()).device)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": self._stem, "blocks": self._blocks}


def load_torchvision_file(model: TorchvisionEncoder, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision-layout state dict (from torchvision's published files) into ``model.net`` and its
    ImageNet head; a file without the head (an encoder only) loads too. Raises ``ValueError`` when it does not fit."""
    path = model.head_path
    head_keys = {f"{path}.weight", f"{path}.bias"}
    body = {k: v for k, v in state.items() if k not in head_keys}
    result = model.net.load_state_dict(body, strict=False)
    missing = list(result.missing_keys)
    if missing or result.unexpected_keys:
        raise ValueError(f"missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")
    if head_keys <= set(state):
        model.imagenet_head.load_state_dict({"weight": state[f"{path}.weight"], "bias": state[f"{path}.bias"]})


def imagenet_weights(arch: str):
    """torchvision's default ImageNet weights enum for ``arch`` (its file comes from torch's hub cache or the
    network)."""
    return torchvision.models.get_model_weights(arch).DEFAULT


__all__ = ["TorchvisionEncoder", "family", "load_torchvision_file", "imagenet_weights"]
