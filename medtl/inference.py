"""Using a finished run: predictions and saliency overlays for new files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.transforms import Compose
from PIL import Image

from medtl.checkpoint import load_model
from medtl.config import ExperimentConfig, _from_dict
from medtl.errors import RunError, find_input_error
from medtl.explain import compute_gradcam, create_overlay
from medtl.transforms import create_transforms, input_to_original


@dataclass
class Prediction:
    """A model's answer for one file."""

    file: str  # file name (not the full path)
    probabilities: dict[str, float]  # class name -> probability
    label: str  # most probable class

    def __str__(self) -> str:
        probs = "  ".join(f"{k}: {v:.3f}" for k, v in self.probabilities.items())
        return f"{self.file}\t{self.label}\t{probs}"


@dataclass
class Explanation:
    """A saliency map on the original image's pixels, and its colour overlay."""

    prediction: Prediction
    image: np.ndarray  # (H, W) in [0, 1]: the preprocessed image at its original size
    saliency: np.ndarray  # (H, W) in [0, 1]
    overlay: np.ndarray  # (H, W, 3) uint8 RGB
    class_name: str  # class the map explains

    def save(self, path: str | Path) -> Path:
        Image.fromarray(self.overlay).save(path)
        return Path(path)


class Predictor:
    """A trained run loaded for inference; files are fed exactly as in training."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise RunError(f"{self.run_dir}: not a medtl run (no config.yaml)")
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        raw.pop("resolved", None)
        self.config: ExperimentConfig = _from_dict(ExperimentConfig, raw, "")
        self.model, meta = load_model(self.run_dir / "model.safetensors")
        self.class_names: list[str] = meta["class_names"]
        self.preprocessing = meta["preprocessing"]
        self.encoder = meta["encoder"]
        deterministic, self._final = create_transforms(self.config.data, self.preprocessing, train=False)
        self._read, self._resize = deterministic.transforms[0], Compose(deterministic.transforms[1:])

    def __repr__(self) -> str:
        return f"Predictor({self.run_dir.name}: {self.encoder}, classes {self.class_names})"

    def _prepare(self, path: str | Path) -> tuple[torch.Tensor, dict]:
        try:
            sample = self._read({"image": str(path), "label": 0})
        except Exception as e:  # report the input error itself, not MONAI's wrapper
            cause = find_input_error(e)
            if cause is None:
                raise
            raise cause from None
        sample["original"] = np.asarray(sample["image"][0])  # windowed, at the file's own size
        resized = self._resize({"image": sample["image"]})
        x = self._final({"image": resized["image"], "label": 0})["image"][None]
        return x, sample

    def _prediction(self, path: str | Path, x: torch.Tensor) -> Prediction:
        with torch.no_grad():
            p = self.model(x).softmax(dim=1)[0].numpy()
        probs = {c: float(v) for c, v in zip(self.class_names, p)}
        return Prediction(file=Path(path).name, probabilities=probs, label=self.class_names[int(p.argmax())])

    def predict(self, path: str | Path) -> Prediction:
        """Class probabilities for one DICOM/NIfTI/PNG file."""
        x, _ = self._prepare(path)
        return self._prediction(path, x)

    def explain(self, path: str | Path, class_name: str | None = None) -> Explanation:
        """Grad-CAM of ``class_name`` (default: the predicted class) drawn on the original image."""
        x, sample = self._prepare(path)
        pred = self._prediction(path, x)
        target = class_name or pred.label
        if target not in self.class_names:
            from medtl.errors import look_up_option
            look_up_option(target, self.class_names, "class")
        cam = compute_gradcam(self.model, x, self.class_names.index(target))
        saliency = input_to_original(cam, sample["original_shape"], self.preprocessing.input_size)
        image = sample["original"]
        overlay = create_overlay(image, saliency, self.config.explain.alpha)
        return Explanation(prediction=pred, image=image, saliency=saliency, overlay=overlay, class_name=target)


def load_run(run_dir: str | Path) -> Predictor:
    """Load a run folder written by ``medtl train`` for prediction and explanation."""
    return Predictor(run_dir)
