"""Using a finished run: predictions and saliency overlays for new files."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medtl.checkpoint import load_saved_run
from medtl.errors import ConfigError, find_input_error, look_up_option
from medtl.explain import explain_input
from medtl.io import Scan, read_image_bounded
from medtl.models.volumetric import is_volume_model
from medtl.predict import batched_logits
from medtl.runtime import Runtime, inference_precision, resolve_device
from medtl.transforms import aggregate_slices, create_transforms, display_image, prepare_inputs


@dataclass
class Prediction:
    """A model's answer for one file."""

    file: str  # file name (not the full path)
    probabilities: dict[str, float]  # class name -> probability (calibrated when the run has a temperature)
    label: str  # decided class: at the run's operating point when it has one, else the most probable
    slice_scores: list[float] | None = None  # "slices" volume modes: probability of ``label`` per slice
    slice_index: int | None = None  # slice shown / most suspicious slice of a volume (None for 2D images)

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
    method: str = "gradcam"  # saliency method that made the map

    def save(self, path: str | Path) -> Path:
        Image.fromarray(self.overlay).save(path)
        return Path(path)


class Predictor:
    """A trained run loaded for inference; files are fed exactly as in training."""

    def __init__(self, run_dir: str | Path, device: str = "auto", precision: str | None = None,
                 bounded: bool = False):
        """``device``: "auto" (a GPU where one can be reached), "cpu", "cuda", ...; ``precision``:
        of the forward passes (default fp32; ``MEDTL_PRECISION`` overrides); ``bounded``: read
        files in the bounded worker (:func:`medtl.io.read_image_bounded`), for untrusted input."""
        self.bounded = bounded
        self._saliency_lock = threading.Lock()  # saliency hooks and gradients live on the shared model
        saved = load_saved_run(run_dir)
        self.run_dir, self.config, self.model = saved.run_dir, saved.config, saved.model
        self.input_record: dict = saved.input_record  # modalities and dimensions seen in training
        self.runtime = Runtime(resolve_device(device), inference_precision(precision), tta=self.config.train.tta)
        self.runtime.prepare(self.model)
        self.class_names: list[str] = saved.class_names
        self.preprocessing = saved.preprocessing
        self.encoder = saved.encoder
        self.temperature: float | None = saved.temperature  # set by `medtl evaluate` (calibration)
        self.operating_point: dict | None = saved.operating_point  # decision threshold chosen on validation
        self._read, self._final = create_transforms(self.config.data, self.preprocessing, train=False)

    def __repr__(self) -> str:
        return f"Predictor({self.run_dir.name}: {self.encoder}, classes {self.class_names})"

    def _prepare(self, path: str | Path | Scan) -> tuple[torch.Tensor, list[dict]]:
        """Model inputs (n, C, size, size) for a file or a Scan read already: one, or one per slice
        in the "slices" modes."""
        if self.bounded and not isinstance(path, Scan):
            path = read_image_bounded(path, volume_index=self.config.data.volume_index)
        try:
            sample = self._read({"image": path if isinstance(path, Scan) else str(path), "label": 0})
        except Exception as e:  # report the input error itself, not MONAI's wrapper
            cause = find_input_error(e)
            if cause is None:
                raise
            raise cause from None
        return prepare_inputs(sample, self._final)

    def _probs(self, x: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        self.model.eval()
        z = batched_logits(self.model, x, self.runtime, batch_size)
        return (z / (self.temperature or 1.0)).softmax(dim=1).numpy()

    def _prediction(self, path: str | Path | Scan, per_input: np.ndarray, parts: list[dict]) -> Prediction:
        data = self.config.data
        p = aggregate_slices(per_input, data.slice_aggregation, data.top_k)
        label = int(p.argmax())
        if self.operating_point is not None and len(p) == 2:
            label = int(p[1] >= self.operating_point["threshold"])
        probs = {c: float(v) for c, v in zip(self.class_names, p)}
        pred = Prediction(file=Path(path.path if isinstance(path, Scan) else path).name, probabilities=probs, label=self.class_names[label])
        if len(parts) > 1:
            pred.slice_scores = [round(float(v), 4) for v in per_input[:, label]]
            pred.slice_index = int(parts[int(per_input[:, label].argmax())]["slice_index"])
        elif parts[0]["slice_index"] >= 0:
            pred.slice_index = int(parts[0]["slice_index"])
        return pred

    def predict(self, path: str | Path | Scan) -> Prediction:
        """Class probabilities for one DICOM file, series folder/zip, NIfTI volume or PNG/JPEG (or
        a :class:`~medtl.io.Scan` read already)."""
        x, parts = self._prepare(path)
        return self._prediction(path, self._probs(x), parts)

    def explain(self, path: str | Path | Scan, class_name: str | None = None, method: str | None = None) -> Explanation:
        """Grad-CAM of ``class_name`` (default: the predicted class) drawn on the original image.

        For a volume read slice by slice, the map is drawn on the slice that scores highest for
        that class.
        """
        if is_volume_model(self.model):
            raise ConfigError(None, f"saliency maps of 3D models ({self.encoder}) are not drawn",
                              "a run of a 2D encoder; use predict() for this one")
        x, parts = self._prepare(path)
        per_input = self._probs(x)
        pred = self._prediction(path, per_input, parts)
        target = class_name or pred.label
        if target not in self.class_names:
            look_up_option(target, self.class_names, "class")
        k = self.class_names.index(target)
        best = int(per_input[:, k].argmax())
        image = display_image(parts[best])
        with self._saliency_lock:  # one map at a time: concurrent backward passes on one model crash (segfault)
            saliency, overlay = explain_input(self.model, x[best:best + 1], image, k,
                                              method or self.config.explain.method, self.runtime,
                                              self.config.explain.alpha)
        if len(parts) > 1:
            pred.slice_index = int(parts[best]["slice_index"])
        return Explanation(prediction=pred, image=image, saliency=saliency, overlay=overlay, class_name=target,
                           method=method or self.config.explain.method)


def load_run(run_dir: str | Path, device: str = "auto", precision: str | None = None,
             bounded: bool = False) -> Predictor:
    """Load a run folder written by ``medtl train`` for prediction and explanation on ``device``
    (``bounded``: read files in the bounded worker, for untrusted input)."""
    return Predictor(run_dir, device=device, precision=precision, bounded=bounded)


__all__ = ["Predictor", "Prediction", "Explanation", "load_run"]
