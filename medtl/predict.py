"""One prediction path: a model's logits for a batch or a data set, then probabilities per study.

Training's validation, a run's test metrics, ``medtl evaluate``, :class:`medtl.inference.Predictor`
and the pipelines all call these functions, so test-time flip averaging (on logits), the
temperature and the aggregation of slices into studies are applied in one place, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medtl.data.dataset import iterate_batches, study_index
from medtl.eval.metrics import choose_threshold, fit_temperature
from medtl.runtime import Runtime
from medtl.transforms import aggregate_studies


def forward_logits(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """fp32 logits of a batch (no gradients; autocast around the forward pass only); with
    ``runtime.tta`` the mean of the logits of the batch and its left-right flip."""
    x = runtime.to_input(x)
    with torch.no_grad():
        with runtime.autocast():
            z = model(x)
            if runtime.tta:
                z = (z.float() + model(torch.flip(x, dims=[-1])).float()) / 2
    return z.float()


def forward_logits_features(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, fp32 pooled encoder features) of a batch in one forward pass: the logits as
    :func:`forward_logits` gives them (flip-averaged with ``runtime.tta``), the features of the image as given."""
    x = runtime.to_input(x)
    with torch.no_grad():
        with runtime.autocast():
            fmap = model.forward_features(x)
            f = model.forward_head(fmap, pre_logits=True)
            z = model.forward_head(fmap)
            if runtime.tta:
                z = (z.float() + model(torch.flip(x, dims=[-1])).float()) / 2
    return z.float(), f.float()


def batched_logits(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int = 32) -> torch.Tensor:
    """:func:`forward_logits` of many inputs (a volume's slices) ``batch_size`` at a time, on the CPU."""
    return torch.cat([forward_logits(model, chunk, runtime).cpu() for chunk in torch.split(x, batch_size)])


def batched_logits_features(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime,
                            batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_logits_features` of many inputs ``batch_size`` at a time, on the CPU."""
    parts = [forward_logits_features(model, chunk, runtime) for chunk in torch.split(x, batch_size)]
    return torch.cat([z.cpu() for z, _ in parts]), torch.cat([f.cpu() for _, f in parts])


def to_probabilities(logits, temperature=1.0, multi_label: bool = False) -> torch.Tensor:
    """Probabilities of logits at ``temperature``: softmax over the classes, or for a multi-label model a
    sigmoid per finding (each finding present or not, independently)."""
    z = torch.as_tensor(logits) / temperature
    return z.sigmoid() if multi_label else z.softmax(dim=1)


@dataclass
class Logits:
    """A model's outputs over a data set, one row per model input, in the data set's order."""

    labels: np.ndarray  # (n,) int: each input's label; multi-label (n, findings) of 0/1
    logits: np.ndarray  # (n, classes) float32
    studies: np.ndarray  # (n,): the study each input belongs to (several inputs per study in "slices" modes)
    aggregation: tuple[str, int] = ("mean", 3)  # how a study's score is made from its inputs' (rule, k)

    def study_probs(self, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities), one row per study: softmax(logits / temperature) (multi-label: a
        sigmoid per finding), then aggregated."""
        probs = to_probabilities(self.logits, temperature, self.multi_label).numpy()
        return aggregate_studies(self.labels, probs, self.studies, *self.aggregation)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2


def fit_decision(val: Logits, n_classes: int, rule: str = "youden") -> tuple[float, dict | None]:
    """(temperature, operating point) chosen on validation logits: the temperature that minimises the
    validation NLL, then (binary tasks) the threshold on the calibrated class-1 probability by ``rule``
    (:func:`medtl.eval.metrics.choose_threshold`); None for more classes (the decision is the argmax).
    Multi-label: one temperature for all findings (binary cross-entropy), and a threshold per finding,
    ``{"thresholds": {finding index: threshold}, "rules": {...}}``; a finding whose validation studies are
    all of one kind keeps 0.5 (said in its rule)."""
    temperature = fit_temperature(val.logits, val.labels)
    if val.multi_label:
        y, p = val.study_probs(temperature)
        thresholds, rules = [], []
        for k in range(y.shape[1]):
            if len(np.unique(y[:, k])) < 2:
                thresholds.append(0.5)
                rules.append("0.5: the validation studies are all of one kind for this finding")
                continue
            t, why = choose_threshold(y[:, k], p[:, k], rule)
            thresholds.append(t)
            rules.append(why)
        return temperature, {"thresholds": thresholds, "rules": rules, "rule": rule}
    if n_classes != 2:
        return temperature, None
    y, p = val.study_probs(temperature)
    threshold, why = choose_threshold(y, p[:, 1], rule)
    return temperature, {"threshold": threshold, "rule": why}


def predict_logits(model: torch.nn.Module, dataset, runtime: Runtime | None = None, batch_size: int = 32) -> Logits:
    """The logits of every input of a :func:`medtl.data.create_dataset` data set, with the model in
    eval mode on ``runtime.device`` (data loading runs outside autocast)."""
    runtime = Runtime.of(model, runtime)
    model.eval()
    labels, logits = [], []
    for batch in iterate_batches(dataset, batch_size, runtime.device):
        logits.append(forward_logits(model, batch["image"], runtime).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    return Logits(np.concatenate(labels), np.concatenate(logits), study_index(dataset),
                  tuple(dataset.aggregation))


def predict_probs(model: torch.nn.Module, dataset, runtime: Runtime | None = None, batch_size: int = 32,
                  temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) per study of a data set: :func:`predict_logits` then :meth:`Logits.study_probs`."""
    return predict_logits(model, dataset, runtime, batch_size).study_probs(temperature)


def extract_features(model: torch.nn.Module, dataset, runtime: Runtime | None = None,
                     batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) on ``runtime.device``: the encoder's pooled output (what the head sees)
    for every input, in eval mode, as fp32."""
    runtime = Runtime.of(model, runtime)
    model.eval()
    feats, labels = [], []
    for batch in iterate_batches(dataset, batch_size, runtime.device):
        x = runtime.to_input(batch["image"])
        with torch.no_grad(), runtime.autocast():
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        feats.append(f.float())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


__all__ = ["to_probabilities", "fit_decision", "forward_logits", "forward_logits_features", "batched_logits", "batched_logits_features",
           "predict_logits", "predict_probs", "extract_features", "Logits"]
