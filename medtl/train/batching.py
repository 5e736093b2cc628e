"""The batch size and the workers of a training run: ``train.batch_size: auto`` (the largest batch that
fits on a GPU, the learning rate scaled with it) and ``train.workers: auto``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from medtl.config import TrainConfig
from medtl.runtime import Runtime, measure_training_speed
from medtl.threads import usable_cores

REFERENCE_BATCH = 8  # train.lr is the learning rate for batches of this size (the default batch_size)


AUTO_BATCHES = (256, 128, 64, 32, 16, 8)  # batch_size "auto" on a GPU: the largest that fits, in this order


def auto_batch_size(n_train: int, device: torch.device, fits: Callable[[int], bool], world: int = 1) -> tuple[int, str]:
    """``train.batch_size: auto``: (global batch size, the rule in words). On a CPU the reference batch
    of 8 (a CPU computes no faster per image in larger batches, and small data sets want more steps),
    rounded to a multiple of the ``world`` processes. On a GPU, ``world`` times the largest per-process
    batch ``b`` of :data:`AUTO_BATCHES` that leaves at least 8 steps per epoch and for which ``fits(b)``
    (a training step of ``b`` inputs runs without running out of memory), tried largest first."""
    if device.type != "cuda":
        b = max(1, round(REFERENCE_BATCH / world)) * world
        return b, f"{b} on a CPU (no faster per image in larger batches)"
    for b in AUTO_BATCHES:
        if b == REFERENCE_BATCH or (n_train // (b * world) >= 8 and fits(b)):
            each = f" ({b} in each of {world} processes)" if world > 1 else ""
            return b * world, (
                f"{b * world}{each}: the largest of {', '.join(map(str, AUTO_BATCHES))} with at least "
                f"8 steps per epoch over {n_train} training inputs that fits in the GPU's memory"
            )
    return REFERENCE_BATCH * world, ""


def scaled_lr(lr: float, batch_size: int) -> float:
    """``lr`` (set for batches of :data:`REFERENCE_BATCH`) at ``batch_size``: square-root scaling, the rule
    for Adam-family optimisers (Malladi et al. 2022; Granziol et al. 2022)."""
    return lr * math.sqrt(batch_size / REFERENCE_BATCH)


def _out_of_memory(e: BaseException) -> bool:
    """Whether an error is a device allocation failure (torch's own, or one raised by cuDNN/cuBLAS)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError)
        and any(m in str(e) for m in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED"))
    )


def resolve_batch(
    cfg: TrainConfig,
    model: torch.nn.Module,
    train_ds,
    device: torch.device,
    runtime: Runtime | None = None,
    world: int = 1,
) -> tuple[TrainConfig, dict]:
    """``cfg`` with an integer batch size (``auto`` resolved by :func:`auto_batch_size`, the learning rate
    scaled by :func:`scaled_lr`), and the record saved with the run: batch size, learning rate, rule.
    The probe's steps draw no numbers from the seeded generators (they are forked)."""
    if cfg.batch_size != "auto":
        return cfg, {"batch_size": cfg.batch_size, "lr": cfg.lr, "rule": "set in the configuration"}
    runtime = runtime or Runtime(device)
    shape = tuple(train_ds[0]["image"].shape)

    def fits(b: int) -> bool:
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                measure_training_speed(model, shape, b, runtime, steps=1)
            return True
        except RuntimeError as e:  # (OutOfMemoryError is one)
            if not _out_of_memory(e):
                raise
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    b, rule = auto_batch_size(len(train_ds), device, fits, world)
    lr = scaled_lr(cfg.lr, b)
    if b != REFERENCE_BATCH:
        rule += f"; learning rate {cfg.lr:g} x sqrt({b}/{REFERENCE_BATCH}) = {lr:.3g}"
    return dataclasses.replace(cfg, batch_size=b, lr=lr), {"batch_size": b, "lr": lr, "rule": rule}


def loader_workers(setting: int | str, device: torch.device) -> int:
    """``train.workers``: processes preparing inputs (a data set's store, once; data sets that are not
    stores, every epoch). "auto": none on a CPU (they would take cores from the model), on a GPU one per
    spare core up to 8."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(0, min(8, usable_cores() - 1))


__all__ = ["auto_batch_size", "scaled_lr", "resolve_batch", "loader_workers", "REFERENCE_BATCH", "AUTO_BATCHES"]
