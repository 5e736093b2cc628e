"""Saliency maps (MONAI Grad-CAM on the encoder's last feature map) and their overlays."""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM
from monai.visualize.utils import blend_images

from medtl.errors import MedtlInputError
from medtl.models.encoders import cam_layer_name


def normalize_map(x: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] with high = salient (MONAI's default_normalizer maps max to 0)."""
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape)


def compute_gradcam(model: torch.nn.Module, x: torch.Tensor, class_idx: int | None = None) -> np.ndarray:
    """Grad-CAM of ``class_idx`` (default: the predicted class) for one input (1, C, H, W).

    Returns an (H, W) map in [0, 1] at the input's resolution.
    """
    n_classes = model.num_classes
    if class_idx is not None and not 0 <= class_idx < n_classes:
        raise MedtlInputError(None, f"target class {class_idx} does not exist", f"0..{n_classes - 1}")
    model.eval()
    cam = GradCAM(nn_module=model, target_layers=cam_layer_name(model), postprocessing=normalize_map)
    with torch.enable_grad():
        result = cam(x.float(), class_idx=class_idx)
    return result[0, 0].detach().cpu().numpy().astype(np.float32)


def create_overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a saliency map (H, W, [0, 1]) over a grey image (H, W, [0, 1]) as uint8 RGB (H, W, 3).

    Uses MONAI's ``blend_images`` with the 'jet' colour map; opacity grows with saliency, so
    regions the model ignored show the plain image.
    """
    img = np.clip(np.asarray(image, np.float32), 0, 1)[None]
    sal = np.clip(np.asarray(saliency, np.float32), 0, 1)[None]
    rgb = blend_images(img, sal, alpha=alpha * sal, cmap="jet", rescale_arrays=False,
                       transparent_background=False)
    return (np.clip(np.asarray(rgb), 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
