"""One prediction path: a network's logits and features for a batch or a data set.

Training's validation, a run's test metrics, ``medtl evaluate``, :class:`medtl.predict.Predictor` and the
pipelines all call these functions. Any network goes through :func:`network_outputs` (a PyTorch model
as :func:`module_network` wraps it, or an exported one, :class:`medtl.predict.network.ExportedNetwork`),
so test-time flip averaging is written once; the temperature, the aggregation of slices into studies and
the decision are applied after, in :mod:`medtl.predict.post`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from medtl.data.dataset import iterate_batches, study_index
from medtl.predict.post import Logits
from medtl.runtime import Runtime

Network = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # an image batch -> (logits, features)


def module_network(model: torch.nn.Module, runtime: Runtime) -> Network:
    """A PyTorch model as a :data:`Network`: inputs placed as ``runtime`` says, no gradients, autocast around
    the forward pass only; fp32 (logits, pooled encoder features) out."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = runtime.to_input(x)
        with torch.no_grad(), runtime.autocast():
            fmap = model.forward_features(x)  # type: ignore[operator]  # a timm method; torch types Module attributes Tensor | Module
            z, f = model.forward_head(fmap), model.forward_head(fmap, pre_logits=True)  # type: ignore[operator]  # as above
        return z.float(), f.float()

    return run


def network_outputs(network: Network, x: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of a batch; with ``tta`` the logits are the mean of the batch's and its left-right
    flip's (the features are the image's as given). The one place test-time augmentation is applied."""
    z, f = network(x)
    if tta:
        z = (z + network(torch.flip(x, dims=[-1]))[0]) / 2
    return z, f


def forward_logits(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """fp32 logits of a batch (flip-averaged with ``runtime.tta``)."""
    return network_outputs(module_network(model, runtime), x, runtime.tta)[0]


def batched_outputs(
    network: Network, x: torch.Tensor, tta: bool = False, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`network_outputs` of many inputs (a volume's slices) ``batch_size`` at a time, on the CPU."""
    parts = [network_outputs(network, chunk, tta) for chunk in torch.split(x, batch_size)]
    return torch.cat([z.cpu() for z, _ in parts]), torch.cat([f.cpu() for _, f in parts])


def batched_logits(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int = 32) -> torch.Tensor:
    """:func:`forward_logits` of many inputs ``batch_size`` at a time, on the CPU."""
    return batched_outputs(module_network(model, runtime), x, runtime.tta, batch_size)[0]


def predict_logits(model: torch.nn.Module, dataset, runtime: Runtime | None = None, batch_size: int = 32) -> Logits:
    """The logits of every input of a :func:`medtl.data.create_dataset` data set, with the model in
    eval mode on ``runtime.device`` (data loading runs outside autocast)."""
    runtime = Runtime.of(model, runtime)
    model.eval()
    labels, logits = [], []
    for batch in iterate_batches(dataset, batch_size, runtime.device):
        logits.append(forward_logits(model, batch["image"], runtime).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    return Logits(np.concatenate(labels), np.concatenate(logits), study_index(dataset), tuple(dataset.aggregation))


def predict_probs(
    model: torch.nn.Module, dataset, runtime: Runtime | None = None, batch_size: int = 32, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) per study of a data set: :func:`predict_logits` then :meth:`Logits.study_probs`."""
    return predict_logits(model, dataset, runtime, batch_size).study_probs(temperature)


def extract_features(
    model: torch.nn.Module, dataset, runtime: Runtime | None = None, batch_size: int = 32, progress=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) on ``runtime.device``: the encoder's pooled output (what the head sees)
    for every input, in eval mode, as fp32. ``progress``: a :class:`medtl.progress.Steps` over the inputs."""
    runtime = Runtime.of(model, runtime)
    model.eval()
    feats, labels = [], []
    network = module_network(model, runtime)
    for batch in iterate_batches(dataset, batch_size, runtime.device):
        feats.append(network(batch["image"])[1])
        labels.append(batch["label"])
        if progress is not None:
            progress.advance(len(batch["label"]))
    return torch.cat(feats), torch.cat(labels)


__all__ = [
    "Network",
    "module_network",
    "network_outputs",
    "forward_logits",
    "batched_outputs",
    "batched_logits",
    "predict_logits",
    "predict_probs",
    "extract_features",
]
