"""``fit()``: train a model through the stages of its strategy and keep the best validation epoch.

The pieces, each in its own module: the strategies as lists of stages (:mod:`~medtl.train.stages`), the loop
that runs them (:mod:`~medtl.train.trainer`, :mod:`~medtl.train.loop`), what it minimises
(:mod:`~medtl.train.objectives`), few-shot heads (:mod:`~medtl.train.heads`), the batch size
(:mod:`~medtl.train.batching`), and training several times to keep the best (``auto``) or to average seeds
(``ensemble``; :mod:`~medtl.train.search`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.utils import set_determinism

from medtl.config import TrainConfig
from medtl.errors import ConfigError
from medtl.models.groups import ALL, encoder_groups, set_trainable
from medtl.models.peft import merge_lora
from medtl.options import FEW_SHOT_HEADS
from medtl.train.checkpoint import resume_boundary
from medtl.train.search import fit_auto, fit_soup
from medtl.train.stages import plan_stages
from medtl.train.trainer import FitResult, Trainer


def fit(
    model: torch.nn.Module,
    train_ds,
    val_ds,
    cfg: TrainConfig,
    num_classes: int,
    on_improve: Callable | None = None,
    unlabelled_ds=None,
    monitor=None,
) -> FitResult:
    """Train ``model`` through the stages of its strategy; keep the best validation epoch.

    Validation AUC (or, where undefined, minus validation loss) picks the epoch whose weights
    are restored at the end; ``on_improve(model, row)`` is called at each new best (to write a
    checkpoint, so an interrupted run keeps its last good weights). Every stage restarts AdamW
    with warm-up + cosine decay. ``unlabelled_ds`` (a data set of unlabelled inputs) adds FixMatch's
    consistency loss to the stages that train the encoder (:class:`medtl.train.objectives.FixMatch`).
    ``monitor`` (:class:`medtl.train.tracking.RunMonitor`) follows the epochs (status, curves) and checkpoints each
    one; the run resumes from its checkpoint where it holds one. (``auto`` and ``ensemble`` train several times:
    their epochs are followed, not checkpointed; a resumed one trains again from the start.)
    """

    def train_one(c: TrainConfig) -> FitResult:
        part = c.strategy if cfg.ensemble == 1 else f"seed{c.seed}"
        follow = monitor.part(part) if monitor is not None else None
        return fit(model, train_ds, val_ds, c, num_classes, unlabelled_ds=unlabelled_ds, monitor=follow)

    if cfg.ensemble > 1:
        return fit_soup(model, train_one, val_ds, cfg, on_improve)
    if cfg.strategy == "auto":
        multi = np.asarray([s["label"] for s in train_ds.data]).ndim == 2
        return fit_auto(model, train_one, cfg, multi, on_improve)
    set_determinism(seed=cfg.seed)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    if hasattr(train_ds, "transform") and hasattr(train_ds.transform, "set_random_state"):
        train_ds.transform.set_random_state(seed=cfg.seed)
    trainer = Trainer(model, train_ds, val_ds, cfg, num_classes, on_improve, unlabelled_ds, monitor)
    return run_strategy(trainer, cfg.strategy)


def run_strategy(trainer: Trainer, strategy: str) -> FitResult:
    """Run the stages of ``strategy`` with ``trainer``; leave the best epoch's weights in its model (every
    parameter trainable again, in eval mode) and return the result."""
    model = trainer.model
    if trainer.multi_label and strategy in FEW_SHOT_HEADS:
        raise ConfigError(
            None,
            f"train.strategy {strategy!r} fits a single-label head",
            "linear_probe, partial, fine_tune, gradual, full, bitfit, lora or lp_ft for a multi-label data set",
        )
    trainer.result.strategy, trainer.result.strategy_reason = strategy, "set in the configuration"
    trainer.log("strategy %s", strategy)
    stages = [
        s for s in plan_stages(trainer.cfg, len(encoder_groups(model)), strategy, trainer.multi_label) if s.epochs > 0
    ]
    trainer.total_epochs = sum(s.epochs for s in stages)
    trainer.stages = stages
    first = resume_boundary(trainer)  # (0 unless resuming)
    try:
        for i in range(first, len(stages)):
            trainer.stage_index = i
            trainer.run_stage(stages[i])
            if trainer.monitor is not None:
                trainer.monitor.save(trainer, (i + 1, 0))
    finally:
        merge_lora(model)  # the plain network again (the best state is kept in its form)
    model.load_state_dict(trainer.best_state)
    set_trainable(model, ALL)
    model.eval()
    result = trainer.result
    if trainer.encoder_seconds:
        result.train_images_per_s = trainer.encoder_images / trainer.encoder_seconds
    return result


__all__ = ["fit", "run_strategy", "FitResult"]
