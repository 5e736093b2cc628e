"""What training minimises, as objects the loop is handed rather than branches inside it.

:class:`Objective` is the supervised loss of a task: a weighted, label-smoothed cross-entropy for
single-label tasks, a binary cross-entropy per finding (with each finding's positive weight) for multi-label
ones. :class:`Mixup` mixes inputs and targets; :class:`FixMatch` adds the consistency loss of unlabelled
images (semi-supervised). :func:`create_objective` builds the task's objective from the training labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medtl.config import TrainConfig


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency weights (normalised to mean 1 over the examples); multi-label 0/1 rows: each
    finding's positive weight, negatives / positives (at most 100), for binary cross-entropy."""
    if labels.ndim == 2:
        pos = labels.sum(axis=0).astype(np.float64)
        return torch.tensor(np.clip((len(labels) - pos) / np.maximum(pos, 1), 0.01, 100.0), dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


class Objective:
    """The supervised loss of a task: :meth:`targets` turns labels into float targets (one-hot, or 0/1 per
    finding), :meth:`__call__` scores logits against (possibly mixed) targets."""

    def __init__(self, num_classes: int, multi_label: bool, weight: torch.Tensor | None, smoothing: float):
        self.num_classes, self.multi_label = num_classes, multi_label
        self.weight = weight  # class weights, or (multi-label) each finding's positive weight; None: unweighted
        self.smoothing = smoothing  # label smoothing towards uniform (1/classes; 1/2 per finding)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Float targets of a batch's labels: one-hot rows, or the 0/1 rows of a multi-label task."""
        return y.float() if self.multi_label else F.one_hot(y, self.num_classes).float()

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of fp32 ``logits`` against ``target``: labels (class indices) or float targets."""
        logits = logits.float()
        if self.multi_label:
            target = target.float() * (1 - self.smoothing) + self.smoothing / 2
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.weight)
        if target.ndim == 1:
            target = self.targets(target)
        target = target * (1 - self.smoothing) + self.smoothing / self.num_classes
        per_sample = -(target * logits.log_softmax(dim=1)).sum(dim=1)
        if self.weight is not None:
            w = target @ self.weight
            return (per_sample * w).sum() / w.sum()
        return per_sample.mean()


def create_objective(labels: np.ndarray, num_classes: int, cfg: TrainConfig, device: torch.device) -> Objective:
    """The objective of a training set whose labels are ``labels`` (class indices, or 0/1 rows: several
    findings per input, a sigmoid and binary cross-entropy each): weighted by class frequency when
    ``train.class_weighting``, smoothed by ``train.label_smoothing``."""
    weight = class_weights(labels, num_classes).to(device) if cfg.class_weighting else None
    return Objective(num_classes, labels.ndim == 2, weight, cfg.label_smoothing)


class Mixup:
    """Mixup (Zhang et al. 2018): each input and its target mixed with another of the batch's, by a weight
    drawn from Beta(alpha, alpha); alpha 0 leaves the batch as it is."""

    def __init__(self, alpha: float, generator: torch.Generator):
        self.alpha, self.generator = alpha, generator

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.alpha <= 0:
            return x, target
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        perm = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


class FixMatch:
    """FixMatch's unlabelled loss (Sohn et al. 2020): a batch of unlabelled inputs, a weak and a strong
    augmentation of each; where the model's answer on the weak view is confident (its probability at least
    ``threshold``; multi-label: per finding, that far from 1/2 either way), that answer is the target of the
    strong view. Averaged over the whole batch (unconfident answers count as 0); the share of confident
    answers is kept per step (:meth:`confident_share`)."""

    def __init__(
        self,
        store,
        weak,
        strong,
        threshold: float,
        weight: float,
        multi_label: bool,
        batch_size: int,
        generator: torch.Generator,
    ):
        self.store, self.weak, self.strong = store, weak, strong  # the unlabelled inputs; the two augmentations
        self.threshold, self.weight, self.multi_label = threshold, weight, multi_label
        self.batch_size, self.generator = batch_size, generator
        self.confident: list[float] = []

    def __len__(self) -> int:
        return len(self.store.images)

    def __call__(self, net, runtime, device: torch.device) -> torch.Tensor:
        """The weighted consistency loss of one unlabelled batch through ``net``."""
        idx = torch.randint(0, len(self), (self.batch_size,), generator=self.generator)
        xu = self.store.batch(idx, device)["image"]
        weak, strong = runtime.to_input(self.weak(xu)), runtime.to_input(self.strong(xu))
        with torch.no_grad(), runtime.autocast():
            zw = net(weak).float()
        with runtime.autocast():
            zs = net(strong).float()
        if self.multi_label:
            p = zw.sigmoid()
            mask = ((p >= self.threshold) | (p <= 1 - self.threshold)).float()
            per = F.binary_cross_entropy_with_logits(zs, (p >= 0.5).float(), reduction="none")
        else:
            conf, pseudo = zw.softmax(dim=1).max(dim=1)
            mask = (conf >= self.threshold).float()
            per = F.cross_entropy(zs, pseudo, reduction="none")
        self.confident.append(float(mask.mean()))
        return self.weight * (per * mask).mean()

    def confident_share(self) -> float | None:
        """The share of confident answers since the last call (None: no unlabelled step ran); starts anew."""
        share = round(float(np.mean(self.confident)), 4) if self.confident else None
        self.confident = []
        return share


__all__ = ["Objective", "create_objective", "class_weights", "Mixup", "FixMatch"]
