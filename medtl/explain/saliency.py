"""Saliency maps and their overlays: Grad-CAM, Grad-CAM++ and occlusion (MONAI) and Integrated Gradients.

Every method returns an (H, W) map in [0, 1] at the model input's resolution, high = salient.
Grad-CAM's target layer is the encoder's last feature map (``cam_layer_name``, from the
encoder spec or timm's ``feature_info``). Integrated Gradients (Sundararajan et al. 2017) is Captum's
``IntegratedGradients``, run in float32 whatever the runtime's autocast.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from captum.attr import IntegratedGradients
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from monai.visualize.utils import blend_images

from medtl.errors import MedtlInputError, look_up_option
from medtl.models.encoders import cam_layer_name
from medtl.runtime import Runtime
from medtl.transforms.chain import input_to_original

METHODS = ("gradcam", "gradcampp", "occlusion", "integrated_gradients")

log = logging.getLogger(__name__)


def normalize_map(x: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] with high = salient (MONAI's default_normalizer maps max to 0)."""
    x = x.float()  # (maps computed under bf16/fp16 autocast)
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape)


def _check_class(model: torch.nn.Module, class_idx: int | None) -> None:
    n_classes: int = model.num_classes  # type: ignore[assignment]  # a timm attribute; torch types it Tensor | Module
    if class_idx is not None and not 0 <= class_idx < n_classes:
        raise MedtlInputError(None, f"target class {class_idx} does not exist", f"0..{n_classes - 1}")


def compute_gradcam(
    model: torch.nn.Module, x: torch.Tensor, class_idx: int | None = None, plus_plus: bool = False
) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) of ``class_idx`` (default: the predicted class) for one input (1, C, H, W)."""
    _check_class(model, class_idx)
    model.eval()
    cls = GradCAMpp if plus_plus else GradCAM
    cam = cls(nn_module=model, target_layers=cam_layer_name(model), postprocessing=normalize_map)
    with torch.enable_grad():
        result = cam(x.float(), class_idx=class_idx)
    return result[0, 0].detach().float().cpu().numpy()


def compute_occlusion(
    model: torch.nn.Module, x: torch.Tensor, class_idx: int | None = None, mask_fraction: float = 0.2
) -> np.ndarray:
    """Occlusion sensitivity (MONAI): how much the class probability drops when each region is hidden."""
    _check_class(model, class_idx)
    model.eval()
    size = x.shape[-1]
    with torch.no_grad():
        if class_idx is None:
            class_idx = int(model(x.float()).argmax(dim=1)[0])
        occ = OcclusionSensitivity(
            model, mask_size=max(4, int(size * mask_fraction)), n_batch=16, verbose=False, overlap=0.25, activate=True
        )
        occ_map, _ = occ(x.float())
    drop = -occ_map[0, class_idx]  # (B, classes, H, W): lower probability when occluded = more important
    return normalize_map(drop[None])[0].cpu().numpy().astype(np.float32)


def compute_integrated_gradients(
    model: torch.nn.Module, x: torch.Tensor, class_idx: int | None = None, steps: int = 24, batch_size: int = 24
) -> np.ndarray:
    """Integrated Gradients from an all-zero (mean-grey) input baseline, summed over channels, absolute value."""
    _check_class(model, class_idx)
    model.eval()
    x = x.float()
    if class_idx is None:
        with torch.no_grad():
            class_idx = int(model(x).argmax(dim=1)[0])
    attribution, delta = integrated_gradients_with_delta(model, x, class_idx, steps, batch_size)
    log.debug("integrated gradients: %d steps, convergence delta %.3g", steps, delta)
    return normalize_map(attribution.sum(dim=1).abs())[0].cpu().numpy().astype(np.float32)  # (1, H, W) -> (H, W)


def integrated_gradients(
    model: torch.nn.Module, x: torch.Tensor, class_idx: int, steps: int = 24, batch_size: int = 24
) -> torch.Tensor:
    """Signed IG attributions (1, C, H, W) of the class logit; they sum to logit(x) - logit(baseline)."""
    return integrated_gradients_with_delta(model, x, class_idx, steps, batch_size)[0]


def integrated_gradients_with_delta(
    model: torch.nn.Module, x: torch.Tensor, class_idx: int, steps: int = 24, batch_size: int = 24
) -> tuple[torch.Tensor, float]:
    """Captum's IG of the class logit and its convergence delta: (attributions (1, C, H, W), their sum
    minus (logit(x) - logit(baseline))).

    The baseline is all zeros; the path integral is the midpoint Riemann sum over ``steps`` points,
    ``batch_size`` points per forward pass. Autocast is switched off: under bf16 autocast the attributions
    of an EfficientNet-Lite0 (64 px, CPU) differed from their float32 values by up to 18 % of the largest.
    """
    x = x.detach().float()
    with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
        attribution, delta = IntegratedGradients(model).attribute(
            x,
            baselines=torch.zeros_like(x),
            target=class_idx,
            n_steps=steps,
            method="riemann_middle",
            internal_batch_size=batch_size,
            return_convergence_delta=True,
        )
    return attribution.detach(), float(delta.sum())


def compute_saliency(
    model: torch.nn.Module,
    x: torch.Tensor,
    class_idx: int | None = None,
    method: str = "gradcam",
    runtime: Runtime | None = None,
) -> np.ndarray:
    """A saliency map of one input (1, C, H, W) by ``method`` (one of :data:`METHODS`).

    The model must already be on ``runtime.device``; the input is moved there and the model's
    forward passes run under the runtime's autocast (default: the model's device, fp32).
    """
    look_up_option(method, METHODS, "saliency method")
    runtime = Runtime.of(model, runtime)
    x = runtime.to_input(x)
    with runtime.autocast():
        if method == "gradcam":
            return compute_gradcam(model, x, class_idx)
        if method == "gradcampp":
            return compute_gradcam(model, x, class_idx, plus_plus=True)
        if method == "occlusion":
            return compute_occlusion(model, x, class_idx)
        return compute_integrated_gradients(model, x, class_idx)


def explain_input(
    model: torch.nn.Module,
    x: torch.Tensor,
    image: np.ndarray,
    class_idx: int | None = None,
    method: str = "gradcam",
    runtime: Runtime | None = None,
    alpha: float = 0.45,
) -> tuple[np.ndarray, np.ndarray]:
    """``(saliency, overlay)`` of one model input (1, C, S, S) drawn on its original (H, W) image: the map
    of ``method`` with the pad-to-square and resize undone, and its colour overlay."""
    cam = compute_saliency(model, x, class_idx, method, runtime=runtime)
    saliency = input_to_original(cam, image.shape[:2], x.shape[-1])
    return saliency, create_overlay(image, saliency, alpha)


def create_overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a saliency map (H, W, [0, 1]) over an image in [0, 1] — grey (H, W) or colour (H, W, 3) —
    as uint8 RGB (H, W, 3).

    Uses MONAI's ``blend_images`` with the 'jet' colour map; opacity grows with saliency, so
    regions the model ignored show the plain image, in its own colours.
    """
    img = np.clip(np.asarray(image, np.float32), 0, 1)
    img = img.transpose(2, 0, 1) if img.ndim == 3 else img[None]
    sal = np.clip(np.asarray(saliency, np.float32), 0, 1)[None]
    rgb = blend_images(img, sal, alpha=alpha * sal, cmap="jet", rescale_arrays=False, transparent_background=False)
    return (np.clip(np.asarray(rgb), 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def add_legend(overlay: np.ndarray, title: str = "") -> np.ndarray:
    """The overlay with a colour bar (low → high saliency) and an optional title, as uint8 RGB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = overlay.shape[:2]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 100 + 1.0), max(2.5, h / 100 + 0.4)), dpi=100)
    im = ax.imshow(overlay, cmap="jet", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, ticks=[0, 1])
    bar.ax.set_yticklabels(["low", "high"], fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]  # the Agg canvas's
    plt.close(fig)
    return rgb
