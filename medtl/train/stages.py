"""Fine-tuning strategies as data: each is a list of :class:`Stage`\\ s (which encoder layer groups train, at
what learning rates), planned by :func:`plan_stages`; one loop (:mod:`medtl.train.trainer`) runs them all.

Layer groups come from timm's ``group_matcher`` (stem, each stage of blocks, head), so "partial",
"gradual" unfreezing and layer-wise learning-rate decay work the same for every encoder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from medtl.config import TrainConfig
from medtl.errors import ConfigError
from medtl.models.groups import ALL, encoder_groups, encoder_modules, head_parameters
from medtl.models.peft import add_lora, is_bitfit_parameter, is_lora_parameter
from medtl.options import FEW_SHOT_HEADS

log = logging.getLogger("medtl.train")


@dataclass(frozen=True)
class Stage:
    """A phase of training with one set of trainable parameters and learning rates."""

    name: str  # "head", "partial", "fine_tune", "unfreeze_3", "full"
    epochs: int  # number of epochs in this stage
    trainable: int  # encoder layer groups trained, counted from the top: 0 = head only, ALL = every group
    head_lr: float  # peak learning rate of the classification head
    encoder_lr: float  # peak learning rate of the top trainable encoder group
    layer_decay: float = 1.0  # each lower group's rate = the one above's * this
    params: str = "all"  # which parameters of the trainable encoder groups train: "all", "bitfit" (biases and
    #   normalisation scales/shifts) or "lora" (low-rank updates of the frozen weights; medtl.models.peft)

    @property
    def head_only(self) -> bool:
        return self.trainable == 0


def auto_candidates(cfg: TrainConfig, multi_label: bool = False) -> tuple[str, ...]:
    """The strategies ``auto`` tries (``train.auto_candidates``); single-label heads are left out for multi-label
    data."""
    return tuple(c for c in cfg.auto_candidates if not (multi_label and c in FEW_SHOT_HEADS))


def from_scratch(cfg: TrainConfig) -> TrainConfig:
    """Settings for training a randomly initialised network: every layer trained at the head's
    learning rate (no layer-wise decay) and BatchNorm statistics learnt (nothing to keep)."""
    return dataclasses.replace(cfg, strategy="full", encoder_lr_mult=1.0, layer_decay=1.0, freeze_bn=False)


def plan_stages(cfg: TrainConfig, n_groups: int, strategy: str | None = None, multi_label: bool = False) -> list[Stage]:
    """The stages of a strategy, for an encoder with ``n_groups`` layer groups.

    ``bitfit`` and ``lora`` train the head, then (after the head's warm-up) only the encoder's biases and
    normalisation parameters, or low-rank updates of its weights, at half the head's rate. ``lp_ft`` (Kumar
    et al. 2022) fits a linear probe to convergence first (the cross-validated logistic regression of
    ``logreg``; for multi-label data a head trained on cached features for ``max(frozen_epochs, 20)`` epochs),
    then fine-tunes everything from that head, with layer-wise decay."""
    strategy = strategy or cfg.strategy
    if strategy == "auto":
        raise ConfigError(None, "strategy 'auto' is resolved by fit(), which tries each of train.auto_candidates")
    enc_lr = cfg.lr * cfg.encoder_lr_mult
    head = [Stage("head", cfg.frozen_epochs, 0, cfg.lr, 0.0)] if cfg.frozen_epochs else []
    if strategy == "linear_probe":
        return [Stage("head", cfg.epochs, 0, cfg.lr, 0.0)]
    if strategy in FEW_SHOT_HEADS:  # fitted in closed form on cached features: one "epoch"
        return [Stage(strategy, 1, 0, cfg.lr, 0.0)]
    if strategy == "full":
        return [Stage("full", cfg.epochs, ALL, cfg.lr, enc_lr, cfg.layer_decay)]
    if strategy in ("bitfit", "lora"):
        return head + [Stage(strategy, cfg.epochs, ALL, cfg.lr / 2, cfg.lr / 2, 1.0, params=strategy)]
    if strategy == "lp_ft":
        probe = (
            Stage("head", max(cfg.frozen_epochs, 20), 0, cfg.lr, 0.0)
            if multi_label
            else Stage("logreg", 1, 0, cfg.lr, 0.0)
        )
        return [probe, Stage("fine_tune", cfg.epochs, ALL, cfg.lr / 2, enc_lr, cfg.layer_decay)]
    if strategy == "partial":
        return head + [
            Stage("partial", cfg.epochs, min(cfg.unfreeze_groups, n_groups), cfg.lr / 2, enc_lr, cfg.layer_decay)
        ]
    if strategy == "gradual":  # fastai/ULMFiT: one more group from the top every `gradual_epochs`
        stages, left = list(head), cfg.epochs
        for k in range(1, n_groups + 1):  # within train.epochs: the last stage takes what is left
            n = min(cfg.gradual_epochs, left) if k < n_groups else left
            if n <= 0:
                break
            stages.append(Stage(f"unfreeze_{k}", n, k if k < n_groups else ALL, cfg.lr / 2, enc_lr, cfg.layer_decay))
            left -= n
        return stages
    return head + [Stage("fine_tune", cfg.epochs, ALL, cfg.lr / 2, enc_lr, cfg.layer_decay)]


def train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Training mode; BatchNorm layers of frozen parts (or all, with ``freeze_bn``) keep their statistics."""
    model.train()
    for m in encoder_modules(model):
        if isinstance(m, _BatchNorm) and (freeze_bn or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def param_groups(model: torch.nn.Module, stage: Stage) -> list[dict]:
    """AdamW parameter groups of a stage: the head at its rate, each trainable encoder group at the rate
    of the one above times the stage's layer decay."""
    groups = [{"params": head_parameters(model), "lr": stage.head_lr}]
    enc = encoder_groups(model)
    k = len(enc) if stage.trainable == ALL else stage.trainable
    for depth, params in enumerate(reversed(enc[len(enc) - k :])):
        params = [p for p in params if p.requires_grad]  # (bitfit, lora: a selection of the group's parameters)
        if params:
            groups.append({"params": params, "lr": stage.encoder_lr * stage.layer_decay**depth})
    return groups


def select_parameters(model: torch.nn.Module, stage: Stage, lora_rank: int = 8) -> None:
    """Within the encoder groups :func:`set_trainable` left trainable, train only the stage's ``params``:
    for "lora", LoRA updates are put on the encoder first (once; see :func:`medtl.models.peft.add_lora`)."""
    if stage.params == "all":
        return
    if stage.params == "lora" and not any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        n = add_lora(model, lora_rank)
        log.info("LoRA rank %d on the encoder: %d trainable parameters", lora_rank, n)
    head = set(map(id, head_parameters(model)))
    for name, p in model.named_parameters():
        if id(p) in head or not p.requires_grad:
            continue
        p.requires_grad_(is_lora_parameter(name) if stage.params == "lora" else is_bitfit_parameter(model, name))


__all__ = [
    "Stage",
    "plan_stages",
    "from_scratch",
    "auto_candidates",
    "param_groups",
    "select_parameters",
    "train_mode",
    "FEW_SHOT_HEADS",
]
