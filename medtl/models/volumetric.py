"""3D CNNs from MONAI (trained from scratch on volumes), behind the same interface as the timm encoders.

They are the baseline the 2D ImageNet encoders are measured against on volumetric data: the
whole volume (``data.volume_mode: "3d"``) goes in, one score per study comes out. The adapter
gives a MONAI ``ResNet`` what medtl's training loop, checkpoints and Grad-CAM use from a timm
model: ``forward_features`` / ``forward_head``, ``get_classifier`` / ``reset_classifier``,
``group_matcher`` (stem, layer1..4) and a ``pretrained_cfg`` preprocessing record.
"""

from __future__ import annotations

import torch
from monai.networks.nets import resnet
from torch import nn

from medtl.models.catalog import RESNET_3D_DEPTHS
from medtl.models.classifier import ClassifierAdapter


def _group_norm_layer(channels: int) -> nn.GroupNorm:
    """GroupNorm (Wu & He, 2018) with up to 32 groups of at least 4 channels: batch-size independent."""
    return nn.GroupNorm(min(32, channels // 4), channels)


def _batch_to_group_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(module, name, _group_norm_layer(child.num_features))
        else:
            _batch_to_group_norm(child)


class ResNet3D(ClassifierAdapter):
    """A MONAI 3D ResNet (single-channel input) with timm's classifier interface.

    ``group_norm=True`` replaces every BatchNorm with GroupNorm. Trained from scratch on a few
    hundred small volumes in batches of 8-16, BatchNorm's running statistics (estimated from 8-16
    values per channel at the 1x1x1 last stage of a 28^3 input) can be far from the batch
    statistics, and the network in eval mode then outputs one saturated class for every volume.
    """

    def __init__(
        self, depth: int, num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, group_norm: bool = False
    ):
        super().__init__()
        build = getattr(resnet, f"resnet{depth}")
        # The stride-2 stem of the 2D ResNets (MONAI's 3D default keeps full resolution, 8x the cost).
        self.net = build(spatial_dims=3, n_input_channels=in_chans, conv1_t_stride=2, num_classes=1, feed_forward=False)
        if group_norm:
            # Swapped after construction: MONAI's ResNet passes its ``norm`` argument to the stem
            # only, its residual blocks keep BatchNorm (Project-MONAI/MONAI PR #9028).
            _batch_to_group_norm(self.net)
        self.num_features = self.net.layer4[-1].conv2.out_channels  # basic blocks (depths 10-34)
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4))

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^net\.(?:conv1|bn1)", "blocks": r"^net\.layer(\d+)"}


def create_volume_encoder(name: str, num_classes: int, in_chans: int = 1, drop_rate: float = 0.0) -> ResNet3D:
    """A randomly initialised MONAI 3D ResNet with medtl's preprocessing record (inputs scaled to [-1, 1]);
    names ending in ``_gn`` use GroupNorm (batch-size independent: the choice from scratch in small batches)."""
    gn = name.endswith("_gn")
    model = ResNet3D(RESNET_3D_DEPTHS[name], num_classes, in_chans, drop_rate, group_norm=gn)
    model.pretrained_cfg = {
        "architecture": f"monai.networks.nets.resnet{RESNET_3D_DEPTHS[name]}(spatial_dims=3)"
        + (", GroupNorm" if gn else ""),
        "input_size": (in_chans, 64, 64, 64),
        "mean": (0.5,),
        "std": (0.5,),
        "interpolation": "trilinear",
        "spatial_dims": 3,
        "first_conv": "net.conv1",
    }
    model.feature_info = [{"module": "net.layer4", "num_chs": model.num_features}]
    return model


def is_volume_model(model: nn.Module) -> bool:
    """True for a 3D network (inputs are volumes, (N, C, D, H, W))."""
    return int(getattr(model, "pretrained_cfg", {}).get("spatial_dims", 2)) == 3
