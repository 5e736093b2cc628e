"""The training recipe: one way from a configuration and decoded studies to a trained model.

``medtl train`` (:func:`medtl.train.run_experiment`), the pipelines (label efficiency, domain shift,
cross-validation), the learning-rate finder and the evaluation's shuffled-label check all train through
:func:`train_model`, so none of them rebuilds the seeding, the encoder, the transforms and the data sets
by hand.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from medtl.config import ExperimentConfig
from medtl.models import Preprocessing, create_model, resolve_preprocessing
from medtl.train.data import create_datasets
from medtl.train.fitting import fit
from medtl.train.trainer import FitResult


def create_seeded_model(
    cfg: ExperimentConfig, n_classes: int, seed: int | None = None, pretrained: bool | None = None
) -> tuple[torch.nn.Module, Preprocessing]:
    """The encoder and head of ``cfg.encoder`` for ``n_classes``, its head initialised after seeding torch with
    ``seed`` (default ``cfg.train.seed``), so two runs of one configuration start from the same weights."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return create_model(cfg.encoder, n_classes, pretrained=pretrained)


def train_model(
    cfg: ExperimentConfig,
    train: list[dict] | Dataset,
    val: list[dict] | Dataset,
    n_classes: int,
    *,
    model: torch.nn.Module | None = None,
    unlabelled=None,
    on_improve=None,
    monitor=None,
) -> tuple[torch.nn.Module, FitResult]:
    """Train ``cfg``'s encoder on the ``train`` studies, choosing epochs on ``val``; return the model (the best
    validation epoch's weights, in eval mode) and what training recorded. ``train`` and ``val``: decoded
    studies (:attr:`medtl.train.PreparedData.sets`), or data sets made of them already
    (:func:`medtl.train.data.create_datasets`, :meth:`medtl.train.PreparedData.datasets`).

    ``model``: the network to train (default: :func:`create_seeded_model`); ``unlabelled``: a data set of
    unlabelled inputs for semi-supervised training; ``on_improve(model, row)``: called at each new best
    epoch; ``monitor``: follows the epochs and checkpoints them (:class:`medtl.train.tracking.RunMonitor`), and
    holds the checkpoint to resume from."""
    if model is None:
        model, pre = create_seeded_model(cfg, n_classes)
    else:
        pre = resolve_preprocessing(model, cfg.encoder.input_size)
    train_ds = create_datasets(cfg.data, pre, train, train=True)[0] if isinstance(train, list) else train
    val_ds = create_datasets(cfg.data, pre, val)[0] if isinstance(val, list) else val
    result = fit(
        model,
        train_ds,
        val_ds,
        cfg.train,
        num_classes=n_classes,
        on_improve=on_improve,
        unlabelled_ds=unlabelled,
        monitor=monitor,
    )
    return model.eval(), result


__all__ = ["train_model", "create_seeded_model"]
