"""Using a finished run: predictions and saliency overlays for new files (:class:`Predictor`)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medtl.errors import ConfigError, MedtlError, MedtlInputError, RunError, find_input_error, look_up_option
from medtl.explain import explain_input
from medtl.io import Scan, read_image, read_image_bounded
from medtl.models.volumetric import is_volume_model
from medtl.options import BACKENDS, DECISION_SOURCES, DecisionSource
from medtl.predict.forward import Network, batched_outputs, module_network
from medtl.predict.network import load_network
from medtl.predict.ood import OODDetector, load_detector
from medtl.predict.post import Decision, aggregate_slices
from medtl.predict.refusal import UNLIKE_TRAINING, input_refusal
from medtl.run import RunDir, load_saved_run, verify_package
from medtl.runtime import Runtime, inference_precision, resolve_device
from medtl.threads import fit_threads
from medtl.transforms.chain import create_transforms
from medtl.transforms.read import display_image, prepare_inputs


@dataclass
class Prediction:
    """A model's answer for one file, or its refusal to answer."""

    file: str  # file name (not the full path)
    probabilities: dict[str, float]  # class name -> probability (calibrated when the run has a temperature);
    #   empty when the input was refused before the model saw it
    label: str | None  # decided class: at the run's operating point when it has one, else the most probable;
    #   None when refused. Multi-label: the findings decided present joined by "|" ("No Finding" for none)
    slice_scores: list[float] | None = None  # "slices" volume modes: probability of ``label`` per slice
    slice_index: int | None = None  # slice shown / most suspicious slice of a volume (None for 2D images)
    refused: str | None = None  # why the model does not answer for this input (None: it answers)
    ood_score: float | None = None  # distance of the input's features to the training set's (medtl.predict.ood)
    decision: str = "argmax"  # how ``label`` was decided (:attr:`medtl.predict.Decision.basis`): "operating point",
    #   "argmax", "operating points" or "0.5 per finding"
    decision_source: str = "training"  # which step chose the decision: "training" or "evaluation" (both on
    #   validation data)
    threshold: float | None = None  # binary models at an operating point: the threshold on the second class
    thresholds: dict[str, float] | None = None  # multi-label models: each finding's threshold
    study_key: str = ""  # a hash of the DICOM StudyInstanceUID (no patient data), "" for other files
    findings: list[str] | None = None  # multi-label models: the findings decided present (each probability at
    #   or above its threshold); None for single-label models and refusals

    def __str__(self) -> str:
        if self.refused:
            return f"{self.file}\tREFUSED\t{self.refused}"
        probs = "  ".join(f"{k}: {v:.3f}" for k, v in self.probabilities.items())
        return f"{self.file}\t{self.label}\t{probs}"


@dataclass
class Explanation:
    """A saliency map on the original image's pixels, and its colour overlay."""

    prediction: Prediction
    image: np.ndarray | None  # (H, W) in [0, 1]: the preprocessed image at its original size (None: refused)
    saliency: np.ndarray | None  # (H, W) in [0, 1]
    overlay: np.ndarray | None  # (H, W, 3) uint8 RGB
    class_name: str | None  # class the map explains
    method: str = "gradcam"  # saliency method that made the map

    def save(self, path: str | Path) -> Path:
        if self.overlay is None:
            raise MedtlInputError(path, f"no saliency map: the input was refused ({self.prediction.refused})")
        Image.fromarray(self.overlay).save(path)
        return Path(path)


class Predictor:
    """A trained run loaded for inference; files are fed exactly as in training, and inputs unlike the
    training images are refused (:attr:`Prediction.refused`) rather than answered."""

    def __init__(
        self,
        run_dir: str | Path,
        device: str = "auto",
        precision: str | None = None,
        bounded: bool = False,
        backend: str = "torch",
        decision: DecisionSource = "training",
    ):
        """``device``: "auto" (a GPU where one can be reached), "cpu", "cuda", ...; ``precision``:
        of the forward passes (default fp32; ``MEDTL_PRECISION`` overrides); ``bounded``: read
        files in the bounded worker (:func:`medtl.io.read_image_bounded`), for untrusted input;
        ``backend``: "torch", or for a package written by ``medtl export`` its "onnx" (ONNX Runtime) or
        "torchscript" network, used for predictions (the package's files are checked against their sha256
        first; saliency maps still come from its PyTorch weights); ``decision``: "training" (the decision
        chosen on validation data when the run was trained, saved with its weights) or "evaluation" (the one
        ``medtl evaluate`` chose and saved beside its report)."""
        self.bounded = bounded
        # one model use at a time: saliency methods put hooks on the shared model, which a concurrent forward
        # pass (another page session) would feed with its own activations; concurrent backward passes crash
        self._model_lock = threading.RLock()
        saved = load_saved_run(run_dir)
        self.run_dir, self.config, self.model = saved.run_dir, saved.config, saved.model
        self.input_record: dict = saved.input_record  # modalities and dimensions seen in training
        self.runtime = Runtime(resolve_device(device), inference_precision(precision), tta=self.config.train.tta)
        fit_threads()
        self.runtime.prepare(self.model)
        self.class_names: list[str] = saved.class_names
        self.preprocessing = saved.preprocessing
        self.encoder = saved.encoder
        self.multi_label: bool = saved.multi_label  # several findings, a sigmoid each (class_names: the findings)
        self.decision: Decision = self._decision(saved, look_up_option(decision, DECISION_SOURCES, "decision"))
        self.ood: OODDetector | None = load_detector(self.run_dir)  # None: runs trained before medtl 0.1 kept one
        self._read, self._final = create_transforms(self.config.data, self.preprocessing, train=False)
        self.backend = look_up_option(backend, BACKENDS, "backend")
        self._network: Network = module_network(self.model, self.runtime)
        if backend != "torch":
            record = verify_package(self.run_dir)
            if record["format"] != backend:
                raise RunError(f"{self.run_dir}: the package holds a {record['format']} network, not {backend}")
            self._network = load_network(self.run_dir, backend, self.runtime.device)

    def _decision(self, saved, source: DecisionSource) -> Decision:
        """The decision the predictor answers by: training's (in the weights) or the evaluation's."""
        if source == "evaluation":
            record = RunDir(self.run_dir).read_decision()
            if record is None:
                raise RunError(
                    f"{self.run_dir}: the run has not been evaluated (no {RunDir.EVALUATION}/"
                    f"{RunDir.DECISION}); run `medtl evaluate` first, or use the training decision"
                )
        else:
            record = {"temperature": saved.temperature, "operating_point": saved.operating_point}
        return Decision.from_record(
            self.class_names, self.multi_label, record["temperature"], record["operating_point"], source
        )

    def __repr__(self) -> str:
        return (
            f"Predictor({self.run_dir.name}: {self.encoder}, classes {self.class_names}, decision "
            f"{self.decision.basis} chosen in {self.decision.source})"
        )

    def read(self, path: str | Path | Scan) -> Scan:
        """The scan of a file, folder or zip (in the bounded worker when the predictor is ``bounded``)."""
        if isinstance(path, Scan):
            return path
        if self.bounded:
            return read_image_bounded(path, volume_index=self.config.data.volume_index)
        return read_image(path, volume_index=self.config.data.volume_index)

    def _prepare(self, scan: Scan) -> tuple[torch.Tensor, list[dict]]:
        """Model inputs (n, C, size, size) for a scan: one, or one per slice in the "slices" modes.

        A file that does not name its modality (NIfTI, PNG) is read as the one modality the model was
        trained on, as training read it (a manifest's ``modality`` column): a CT NIfTI is windowed in HU.
        """
        item = {"image": scan, "label": 0}
        seen = [m for m in self.input_record.get("modalities", []) if m not in ("UNKNOWN", "")]
        if not scan.modality and len(seen) == 1:
            item["modality"] = seen[0]
        try:
            sample = self._read(item)
        except Exception as e:  # report the input error itself, not MONAI's wrapper
            cause = find_input_error(e)
            if cause is None:
                raise
            raise cause from None
        return prepare_inputs(sample, self._final)

    def inputs(self, scan: Scan) -> tuple[torch.Tensor, list[dict]]:
        """The model inputs of a scan and their parts (slice indices), to pass to :meth:`saliency` as
        ``prepared=(x, parts, None)`` when several maps of one scan are drawn."""
        return self._prepare(scan)

    def _probs(self, x: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, torch.Tensor]:
        """(probabilities, features) per input, from the run's network (exported or not)."""
        self.model.eval()
        with self._model_lock:
            z, f = batched_outputs(self._network, x, self.runtime.tta, batch_size)
        return self.decision.probabilities(z), f

    def _prediction(self, scan: Scan, per_input: np.ndarray, parts: list[dict]) -> Prediction:
        data, decision = self.config.data, self.decision
        p = aggregate_slices(per_input, data.slice_aggregation, data.top_k)
        probs = {c: float(v) for c, v in zip(self.class_names, p)}
        label = decision.label(p)
        pred = Prediction(
            file=Path(scan.path).name,
            probabilities=probs,
            label=label,
            decision=decision.basis,
            decision_source=decision.source,
            study_key=str(scan.header.get("study_key", "")),
        )
        if self.multi_label:
            pred.findings = decision.findings(p)
            pred.thresholds = dict(zip(self.class_names, decision.finding_thresholds))
            k = int(p.argmax())  # a volume's slices are ranked by the most probable finding
        else:
            pred.threshold = decision.threshold
            k = self.class_names.index(label)
        if len(parts) > 1:
            pred.slice_scores = [round(float(v), 4) for v in per_input[:, k]]
            pred.slice_index = int(parts[int(per_input[:, k].argmax())]["slice_index"])
        elif parts[0]["slice_index"] >= 0:
            pred.slice_index = int(parts[0]["slice_index"])
        return pred

    def _judge(self, scan: Scan, check: bool) -> tuple[Prediction, torch.Tensor | None, list[dict], np.ndarray | None]:
        """(the prediction, or a refusal made from the header; inputs, parts and probabilities per input: None,
        [] and None after a refusal from the header)."""
        reason = input_refusal(self.input_record, scan) if check else None
        if reason:
            return (
                Prediction(
                    file=Path(scan.path).name,
                    probabilities={},
                    label=None,
                    refused=reason,
                    study_key=str(scan.header.get("study_key", "")),
                ),
                None,
                [],
                None,
            )
        x, parts = self._prepare(scan)
        per_input, features = self._probs(x)
        return self._finish(scan, per_input, features, parts, check), x, parts, per_input

    def _finish(
        self, scan: Scan, per_input: np.ndarray, features: torch.Tensor, parts: list[dict], check: bool
    ) -> Prediction:
        """The prediction of a scan from its inputs' probabilities and features: the decision, then the
        out-of-distribution score and (with ``check``) the refusal."""
        pred = self._prediction(scan, per_input, parts)
        if self.ood is not None:
            pred.ood_score = round(float(np.median(self.ood.score(features))), 6)
            if check and self.ood.refuses(pred.ood_score):
                pred.refused = UNLIKE_TRAINING.format(pct=f"{self.ood.quantile:.0%}")
        if pred.refused:
            pred.label = pred.findings = None
        return pred

    def predict_many(
        self, items: Iterable[str | Path | Scan], check: bool = True, batch_size: int = 32
    ) -> Iterator[tuple[str | Path | Scan, Prediction | MedtlError]]:
        """(item, its :class:`Prediction`) for every file, folder or scan of ``items``, in order, with the
        inputs of several files put through the model together, ``batch_size`` at a time. A file that
        cannot be read gives its typed error in place of a prediction, and the others go on."""
        pending: list[tuple] = []  # (item, scan, inputs, parts) waiting for the model

        def flush():
            if not pending:
                return
            x = torch.cat([p[2] for p in pending])
            per_input, features = self._probs(x, batch_size)
            start = 0
            for item, scan, xi, parts in pending:
                end = start + len(xi)
                yield item, self._finish(scan, per_input[start:end], features[start:end], parts, check)
                start = end
            pending.clear()

        for item in items:
            try:
                scan = self.read(item)
                reason = input_refusal(self.input_record, scan) if check else None
                if reason:
                    yield from flush()
                    yield (
                        item,
                        Prediction(
                            file=Path(scan.path).name,
                            probabilities={},
                            label=None,
                            refused=reason,
                            study_key=str(scan.header.get("study_key", "")),
                        ),
                    )
                    continue
                x, parts = self._prepare(scan)
            except MedtlError as e:
                yield from flush()
                yield item, e
                continue
            pending.append((item, scan, x, parts))
            if sum(len(p[2]) for p in pending) >= batch_size:
                yield from flush()
        yield from flush()

    def predict(self, path: str | Path | Scan, check: bool = True) -> Prediction:
        """Class probabilities for one DICOM file, series folder/zip, NIfTI volume or PNG/JPEG (or
        a :class:`~medtl.io.Scan` read already).

        With ``check`` (the default) the model does not answer for inputs unlike its training images
        (:func:`input_refusal`, and the run's out-of-distribution detector): the prediction then has
        ``refused`` set to the reason, in words, and no ``label``.
        """
        pred, *_ = self._judge(self.read(path), check)
        return pred

    def explain(
        self, path: str | Path | Scan, class_name: str | None = None, method: str | None = None, check: bool = True
    ) -> Explanation:
        """Grad-CAM (or ``method``) of ``class_name`` (default: the predicted class) drawn on the original
        image, with the prediction. A refused input gets no map (``saliency`` None; see :meth:`predict`).

        For a volume read slice by slice, the map is drawn on the slice that scores highest for
        that class.
        """
        if is_volume_model(self.model):
            raise ConfigError(
                None,
                f"saliency maps of 3D models ({self.encoder}) are not drawn",
                "a run of a 2D encoder; use predict() for this one",
            )
        scan = self.read(path)
        pred, x, parts, per_input = self._judge(scan, check)
        if pred.refused:
            return Explanation(
                prediction=pred,
                image=None,
                saliency=None,
                overlay=None,
                class_name=None,
                method=method or self.config.explain.method,
            )
        return self.saliency(scan, pred, class_name, method, (x, parts, per_input))

    def saliency(
        self,
        scan: Scan,
        prediction: Prediction,
        class_name: str | None = None,
        method: str | None = None,
        prepared: tuple | None = None,
        slice_index: int | None = None,
    ) -> Explanation:
        """The map of ``method`` for a prediction made already (:meth:`predict`): the forward pass that
        gave the probabilities is not repeated, only the map is computed. ``slice_index``: the map of
        that slice of a volume read slice by slice (default: the slice that scores highest); a slice the
        model did not judge raises :class:`ConfigError`."""
        if is_volume_model(self.model):
            raise ConfigError(
                None, f"saliency maps of 3D models ({self.encoder}) are not drawn", "a run of a 2D encoder"
            )
        method = method or self.config.explain.method
        x, parts, per_input = prepared or (*self._prepare(scan), None)
        target = class_name or self.default_target(prediction)
        if target not in self.class_names:
            look_up_option(target, self.class_names, "class")
        k = self.class_names.index(target)
        if slice_index is not None and len(parts) > 1:
            found = [i for i, p in enumerate(parts) if int(p["slice_index"]) == int(slice_index)]
            if not found:
                raise ConfigError(
                    None, f"slice {slice_index} was not judged by the model", f"a slice from 0 to {len(parts) - 1}"
                )
            best = found[0]
        elif len(parts) == 1:
            best = 0
        elif per_input is not None:
            best = int(per_input[:, k].argmax())
        elif target == prediction.label and prediction.slice_index is not None:
            best = next(i for i, p in enumerate(parts) if int(p["slice_index"]) == prediction.slice_index)
        else:
            best = int(self._probs(x)[0][:, k].argmax())
        image = display_image(parts[best])
        with self._model_lock:
            saliency, overlay = explain_input(
                self.model, x[best : best + 1], image, k, method, self.runtime, self.config.explain.alpha
            )
        if len(parts) > 1 and slice_index is None:
            prediction.slice_index = int(parts[best]["slice_index"])
        return Explanation(
            prediction=prediction, image=image, saliency=saliency, overlay=overlay, class_name=target, method=method
        )

    def default_target(self, prediction: Prediction) -> str:
        """The class a map explains when none is named: the decided class, or for a multi-label model the
        most probable finding."""
        if self.multi_label or not prediction.label:
            probs = prediction.probabilities
            return max(probs, key=lambda c: probs[c]) if probs else self.class_names[0]
        return prediction.label


def load_run(
    run_dir: str | Path,
    device: str = "auto",
    precision: str | None = None,
    bounded: bool = False,
    backend: str = "torch",
    decision: DecisionSource = "training",
) -> Predictor:
    """Load a run folder written by ``medtl train`` (or a package written by ``medtl export``) for
    prediction and explanation on ``device`` (``bounded``: read files in the bounded worker, for
    untrusted input; ``backend`` and ``decision``: see :class:`Predictor`)."""
    return Predictor(run_dir, device=device, precision=precision, bounded=bounded, backend=backend, decision=decision)


__all__ = ["Predictor", "Prediction", "Explanation", "load_run"]
