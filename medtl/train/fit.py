"""One training loop; fine-tuning strategies are data (a list of stages), not copies of the loop."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.utils import set_determinism
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from medtl.config import TrainConfig
from medtl.eval.metrics import compute_auc

log = logging.getLogger("medtl.train")


@dataclass(frozen=True)
class Stage:
    """A phase of training with one set of trainable parameters and learning rates."""

    name: str  # "head" (encoder frozen), "fine_tune" or "full"
    epochs: int  # number of epochs in this stage
    train_encoder: bool  # whether encoder weights are updated (False: frozen, BN statistics too)
    head_lr: float  # peak learning rate of the classification head
    encoder_lr: float  # peak learning rate of the encoder (ignored when frozen)


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    """The stages of a strategy: linear probe, fine_tune (fastai-style freeze then unfreeze) or full."""
    enc_lr = cfg.lr * cfg.encoder_lr_mult
    if cfg.strategy == "linear_probe":
        return [Stage("head", cfg.epochs, False, cfg.lr, 0.0)]
    if cfg.strategy == "full":
        return [Stage("full", cfg.epochs, True, cfg.lr, enc_lr)]
    stages = [Stage("head", cfg.frozen_epochs, False, cfg.lr, 0.0)] if cfg.frozen_epochs else []
    return stages + [Stage("fine_tune", cfg.epochs, True, cfg.lr / 2, enc_lr)]


@dataclass
class FitResult:
    """What training produced besides the weights left in the model (those of the best epoch)."""

    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    best_score: float = -math.inf  # validation AUC (or -loss where AUC is undefined) of that epoch
    precision: str = "fp32"  # numeric precision actually used
    device: str = "cpu"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """bf16 only where the hardware runs it natively (AVX-512 BF16/AMX on CPU, or a bf16 GPU)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(model.get_classifier().parameters())


def encoder_modules(model: torch.nn.Module):
    head = set(map(id, model.get_classifier().modules()))
    return [m for m in model.modules() if id(m) not in head and m is not model]


def set_trainable(model: torch.nn.Module, train_encoder: bool) -> None:
    """Freeze or unfreeze every parameter outside the head; the head always trains."""
    head = set(map(id, head_parameters(model)))
    for p in model.parameters():
        p.requires_grad_(train_encoder or id(p) in head)


def _train_mode(model: torch.nn.Module, train_encoder: bool, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn or not train_encoder:  # a frozen encoder keeps its BatchNorm statistics too
        for m in encoder_modules(model):
            if isinstance(m, _BatchNorm):
                m.eval()


def predict_probs(model: torch.nn.Module, dataset, batch_size: int = 32, device: str | torch.device = "cpu",
                  precision: str = "fp32", channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of a dataset of {"image", "label"} samples, in order."""
    device = torch.device(device)
    model.eval()
    labels, probs = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for batch in loader:
            x = batch["image"].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probs.append(model(x).float().softmax(dim=1).cpu().numpy())
            labels.append(np.asarray(batch["label"]))
    return np.concatenate(labels), np.concatenate(probs)


def _class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def fit(model: torch.nn.Module, train_ds, val_ds, cfg: TrainConfig, num_classes: int) -> FitResult:
    """Train ``model`` through the stages of ``cfg.strategy``; keep the best validation epoch.

    Validation AUC (or, where undefined, minus validation loss) picks the epoch whose weights
    are restored at the end. Every stage restarts AdamW with warm-up + cosine decay.
    """
    set_determinism(seed=cfg.seed)
    if hasattr(train_ds, "transform") and hasattr(train_ds.transform, "set_random_state"):
        train_ds.transform.set_random_state(seed=cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_labels = np.asarray([s["label"] for s in train_ds.data])
    weights = _class_weights(train_labels, num_classes).to(device) if cfg.class_weighting else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0, generator=generator,
                        drop_last=len(train_ds) > cfg.batch_size)
    result = FitResult(precision=precision, device=str(device))
    best_state = copy.deepcopy(model.state_dict())
    stages = [s for s in plan_stages(cfg) if s.epochs > 0]
    total_epochs, epoch = sum(s.epochs for s in stages), 0
    for stage in stages:
        set_trainable(model, stage.train_encoder)
        groups = [{"params": head_parameters(model), "lr": stage.head_lr}]
        if stage.train_encoder:
            head = set(map(id, groups[0]["params"]))
            groups.append({"params": [p for p in model.parameters() if id(p) not in head], "lr": stage.encoder_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        steps = stage.epochs * len(loader)
        warmup = max(1, int(cfg.warmup_epochs * len(loader)))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
        stale = 0
        for _ in range(stage.epochs):
            epoch += 1
            t0 = time.perf_counter()
            _train_mode(model, stage.train_encoder, cfg.freeze_bn)
            losses = []
            for batch in loader:
                x, y = batch["image"].to(device), torch.as_tensor(batch["label"]).long().to(device)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
            y_val, p_val = predict_probs(model, val_ds, cfg.batch_size, device, precision, cfg.channels_last)
            val_loss = float(torch.nn.functional.cross_entropy(torch.log(torch.from_numpy(p_val).clamp_min(1e-7)),
                                                               torch.from_numpy(y_val).long()))
            val_auc = compute_auc(y_val, p_val)
            score = val_auc if val_auc is not None else -val_loss
            row = {"epoch": epoch, "stage": stage.name, "train_loss": float(np.mean(losses)) if losses else None,
                   "val_loss": val_loss, "val_auc": val_auc, "seconds": time.perf_counter() - t0}
            result.history.append(row)
            improved = score > result.best_score
            if improved:
                result.best_score, result.best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            log.info("epoch %d/%d [%s] train loss %.4f  val loss %.4f  val AUC %s  %.1fs%s", epoch, total_epochs,
                     stage.name, row["train_loss"] or float("nan"), val_loss,
                     f"{val_auc:.3f}" if val_auc is not None else "n/a", row["seconds"], "  *" if improved else "")
            if stale >= cfg.patience:
                log.info("stage %s stopped early: no better validation score for %d epochs", stage.name, stale)
                break
    model.load_state_dict(best_state)
    set_trainable(model, True)
    model.eval()
    return result


__all__ = ["Stage", "plan_stages", "fit", "FitResult", "predict_probs", "set_trainable"]
