"""The state training resumes from: ``RUN/checkpoint.pt``, replaced atomically at the end of every epoch.

It holds what the next epoch depends on, so that a resumed run gives the same weights as one that was never
stopped (on the same machine, with the same thread count): the model's weights as they are (LoRA adapters
included), the optimiser, the learning-rate schedule and the fp16 loss scaler of the running stage, where the
strategy stands (which stage, how many of its epochs are done), the best epoch so far (its score, validation
loss and weights), the history, and every random generator training draws from: torch's, numpy's and Python's
global ones (CUDA's too), and the trainer's own (mixup and cached-feature batches, batch augmentation,
FixMatch). The order of batches needs nothing more: each epoch's is drawn from the seed and the epoch number
(:meth:`medtl.train.trainer.Trainer.loader`).

The file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.errors import RunError

FORMAT = 1  # the checkpoint's layout


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``: a reader (or a
    run killed while writing) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`checkpoint_state`; RunError naming the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # (a damaged file: pickle, zip and torch errors alike)
        raise RunError(f"{path}: not a training checkpoint that can be read ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RunError(f"{path}: not a training checkpoint of this medtl (format {FORMAT})")
    return state


def _generators(trainer) -> dict[str, torch.Generator]:
    """The trainer's own random generators, by name."""
    found = {"trainer": trainer.rng}
    for name, augment in (("augment", trainer.augment), ("fixmatch_strong", getattr(trainer.fixmatch, "strong", None))):
        if augment is not None:
            found[name] = augment.R
            for device, g in augment._device_R.items():
                found[f"{name}@{device}"] = g
    if trainer.fixmatch is not None:
        found["fixmatch"] = trainer.fixmatch.generator
    return found


def rng_states(trainer) -> dict:
    """Every random generator's state: the global ones (torch, CUDA, numpy, Python) and the trainer's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
        "own": {name: g.get_state() for name, g in _generators(trainer).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(trainer, states: dict) -> None:
    """Put every generator back as :func:`rng_states` found it (device generators not yet made are made)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    own = _generators(trainer)
    for name, state in states["own"].items():
        if name not in own and "@" in name:  # a device generator made at its first use: make it now
            base, device = name.split("@", 1)
            augment = trainer.augment if base == "augment" else trainer.fixmatch.strong
            own[name] = augment._device_R.setdefault(device, torch.Generator(device=device))
        own[name].set_state(state)


def checkpoint_state(trainer, position: tuple[int, int], optimizer=None, schedule=None) -> dict:
    """What :func:`save_atomic` writes after an epoch: ``position`` = (stage index, epochs of it done) of the
    next epoch to run; ``optimizer`` and ``schedule``: the running stage's (None at a stage's end)."""
    result = trainer.result
    return {
        "format": FORMAT,
        "stage": position[0],
        "stage_epochs": position[1],
        "epoch": trainer.epoch,
        "model": trainer.model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "schedule": schedule.state_dict() if schedule is not None else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "best": {
            "state": trainer.best_state,
            "score": result.best_score,
            "epoch": result.best_epoch,
            "val_loss": trainer.best_val_loss,
        },
        "stale": trainer.stale,
        "history": copy.deepcopy(result.history),
        "encoder": [trainer.encoder_images, trainer.encoder_seconds],
        "rng": rng_states(trainer),
    }


def restore_progress(trainer, state: dict) -> None:
    """The trainer's record of the epochs done (history, best epoch, counters) from a checkpoint."""
    best, result = state["best"], trainer.result
    trainer.best_state = best["state"]
    result.best_score, result.best_epoch, trainer.best_val_loss = best["score"], best["epoch"], best["val_loss"]
    result.history = state["history"]
    trainer.epoch, trainer.stale = state["epoch"], state["stale"]
    trainer.encoder_images, trainer.encoder_seconds = state["encoder"]
    if state["scaler"] is not None and trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["scaler"])


def resume_boundary(trainer) -> int:
    """Where a run resumes: the index of the first stage to run. A checkpoint written at a stage's end is restored
    here (weights, progress, generators), before the next stage sets up its trainable parameters as the run
    that was not stopped did; one written within a stage is restored by :func:`resume_within_stage`."""
    state = trainer.resume
    if state is None:
        return 0
    if state["stage_epochs"] == 0:
        restore_model(trainer.model, state, trainer.resume_path)
        restore_progress(trainer, state)
        restore_rng(trainer, state["rng"])
        trainer.resume = None
        trainer.log("resumed after epoch %d of %d", trainer.epoch, trainer.total_epochs)
    return state["stage"]


def resume_within_stage(trainer, optimizer, schedule) -> int:
    """Epochs of the running stage done already (0 when not resuming within it): the checkpoint's optimiser,
    schedule, progress and generators restored (its weights were, after the stage's set-up)."""
    state = trainer.resume
    if state is None or state["stage"] != trainer.stage_index or state["stage_epochs"] == 0:
        return 0
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    restore_progress(trainer, state)
    restore_rng(trainer, state["rng"])
    trainer.resume = None
    trainer.log("resumed after epoch %d of %d", trainer.epoch, trainer.total_epochs)
    return state["stage_epochs"]


def restore_model(model: torch.nn.Module, state: dict, path: Path) -> None:
    """The checkpoint's weights into ``model`` (strict: every tensor, no other); RunError when they do not fit
    (the run's encoder or configuration changed since)."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RunError(
            f"{path}: the checkpoint's weights do not fit the run's model ({str(e).splitlines()[0]})"
        ) from None


__all__ = [
    "save_atomic",
    "load_checkpoint",
    "checkpoint_state",
    "rng_states",
    "restore_rng",
    "restore_progress",
    "restore_model",
    "resume_boundary",
    "resume_within_stage",
    "FORMAT",
]
