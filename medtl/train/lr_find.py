"""A learning-rate finder (Smith 2015; fastai's ``lr_find``) for the head of a frozen encoder.

The head is trained on cached encoder features while the learning rate grows exponentially;
the suggestion is the rate where the smoothed loss falls fastest. Nothing is kept: the model
used is thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medtl.config import ExperimentConfig
from medtl.runtime import Runtime, adamw, inference_precision, resolve_device
from medtl.train.batching import REFERENCE_BATCH
from medtl.train.data import prepare_data, read_data
from medtl.train.feature_cache import cached_features
from medtl.train.loop import train_epoch
from medtl.train.recipe import create_seeded_model


@dataclass
class LRFindResult:
    lrs: list[float]  # learning rate of each step
    losses: list[float]  # smoothed training loss of each step
    suggestion: float  # rate at the steepest descent of the smoothed loss, before its lowest point

    def plot(self, path: str | Path) -> Path:
        import matplotlib  # heavy optional import, on use

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        ax.plot(self.lrs, self.losses)
        ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggested {self.suggestion:.2g}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)


def lr_sweep(
    features: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    start: float = 1e-5,
    end: float = 10.0,
    steps: int = 100,
    batch_size: int = 8,
    seed: int = 0,
) -> LRFindResult:
    """Exponential learning-rate sweep of ``head`` (AdamW) on fixed features, through the training loop's
    :func:`medtl.train.loop.train_epoch` (one pass of ``steps`` random batches, an exponential schedule);
    stops when the smoothed loss diverges."""
    gen = torch.Generator().manual_seed(seed)
    opt = adamw(head.parameters(), next(head.parameters()).device, lr=start)
    factor = (end / start) ** (1 / max(1, steps - 1))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor**s)
    lrs, smoothed, avg = [], [], [0.0]

    def step(idx):
        lrs.append(opt.param_groups[0]["lr"])
        return F.cross_entropy(head(features[idx]), labels[idx])

    def on_loss(losses: list[float]) -> bool:  # a bias-corrected running mean of the loss; stop when it diverges
        avg[0] = 0.9 * avg[0] + 0.1 * losses[-1]
        smoothed.append(avg[0] / (1 - 0.9 ** len(losses)))
        return len(losses) > 11 and (smoothed[-1] > 4 * min(smoothed) or not math.isfinite(smoothed[-1]))

    batches = (torch.randint(0, len(features), (batch_size,), generator=gen) for _ in range(steps))
    train_epoch(batches, step, opt, schedule, on_loss=on_loss)
    grads = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs)))
    skip = min(5, len(grads) - 1)  # the first steps are dominated by the smoothing warm-up
    lowest = int(np.argmin(smoothed))  # past the lowest loss the curve only shows the divergence
    if lowest > skip + 1:  # the steepest descent on the way down to the lowest loss
        suggestion = lrs[skip + int(np.argmin(grads[skip:lowest]))]
    else:  # no descent to speak of: a tenth of the rate at the lowest loss
        suggestion = lrs[lowest] / 10
    return LRFindResult(lrs, smoothed, suggestion)


def find_lr(cfg: ExperimentConfig, steps: int = 100) -> LRFindResult:
    """Build the encoder and data of ``cfg``, cache the training features, sweep the head's learning rate."""
    manifest = read_data(cfg.data)
    model, pre = create_seeded_model(cfg, len(manifest.class_names))
    prepared = prepare_data(cfg.data, pre, cfg.train.seed, manifest)
    train_ds, _, _ = prepared.datasets(cfg.data, pre)
    runtime = Runtime(
        resolve_device(cfg.train.device), inference_precision(cfg.train.precision), cfg.train.channels_last
    )
    runtime.prepare(model)
    features, labels = cached_features(model, train_ds, runtime)
    batch_size = cfg.train.batch_size if cfg.train.batch_size != "auto" else REFERENCE_BATCH
    return lr_sweep(features, labels, model.get_classifier(), steps=steps, batch_size=batch_size, seed=cfg.train.seed)
