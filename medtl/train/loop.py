"""The inner training loop and what feeds it: one pass of optimisation steps (:func:`train_epoch`, used by
every stage and by the learning-rate finder), epochs of cycled or cached-feature batches, and batches
prepared in a background thread on a GPU (:func:`prefetch`)."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm


def train_epoch(
    batches: Iterable,
    step: Callable[[Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule=None,
    scaler: torch.amp.GradScaler | None = None,
    on_loss: Callable[[list[float]], bool] | None = None,
    sync_every: int = 1,
) -> list[float]:
    """One pass of the training loop: for each batch, ``step(batch)`` gives the loss; backward, optimizer
    step (through ``scaler`` for fp16), then ``schedule`` steps. ``on_loss(losses so far)`` returning True
    ends the pass early. Every stage of :func:`fit` and the learning-rate finder run through here.

    Reading a loss waits for the device to finish the step. With ``sync_every`` > 1 the losses are read
    every that many steps (on a GPU the next steps are queued meanwhile): ``on_loss`` then sees each loss
    as before, up to ``sync_every - 1`` steps late."""
    losses: list[float] = []
    pending: list[torch.Tensor] = []

    def flush() -> bool:
        values = torch.stack(pending).float().tolist() if pending else []
        pending.clear()
        for v in values:
            losses.append(v)
            if on_loss is not None and on_loss(losses):
                return True
        return False

    for batch in batches:
        loss = step(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if schedule is not None:
            schedule.step()
        pending.append(loss.detach())
        if len(pending) >= sync_every and flush():
            return losses
    flush()
    return losses


def cycled(epoch_batches: Callable[[int], Iterable], steps: int, total: int) -> tuple[Callable[[int], Iterable], int]:
    """(epoch -> ``total`` batches, ``total``): an epoch of ``total`` steps made of successive passes over the
    ``steps`` batches of ``epoch_batches`` (each pass in its own seeded order)."""
    if total <= steps:
        return epoch_batches, steps

    def epoch(k: int) -> Iterator:
        n, p = 0, 0
        while n < total:
            for batch in epoch_batches(k * 1009 + p):
                yield batch
                n += 1
                if n >= total:
                    return
            p += 1

    return epoch, total


def loss_sync_steps(device: torch.device) -> int:
    """Steps between reads of the training loss: every step on a CPU (nothing to overlap), every 16 on a GPU
    (a read per step would leave the GPU idle while Python queues the next step)."""
    return 1 if device.type == "cpu" else 16


def feature_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device | None = None):
    """Index batches over ``n`` cached feature rows in a fresh random order (one epoch; ``n`` < batch size: one)."""
    order = torch.randperm(n, generator=generator).to(device)
    steps = n // batch_size if n > batch_size else 1
    return (order[s * batch_size : (s + 1) * batch_size] for s in range(steps))


def use_prefetch(device: torch.device) -> bool:
    """Prepare batches in a background thread? On a GPU yes: it computes apart from the CPU, which can
    then read the next batch. On a CPU no: both would share the same cores (measured on 2 cores:
    8 % slower with the thread)."""
    return device.type != "cpu"


def prefetch(batches: Iterable, depth: int = 2, device: torch.device | None = None) -> Iterator:
    """Iterate ``batches`` with the next ``depth`` ones prepared in a background thread, so reading and
    collating a batch overlaps the model's step on the previous one (torch and numpy release the GIL).
    An error raised while preparing a batch is raised here, in order. On a GPU ``device`` is made the
    thread's current device (each process of a torchrun job has its own; a plain "cuda" means the caller's
    current device: ``torch.cuda.set_device`` refuses a device without an index)."""
    done = object()
    gpu = None
    if device is not None and device.type == "cuda":
        gpu = device.index if device.index is not None else torch.cuda.current_device()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            if gpu is not None:
                torch.cuda.set_device(gpu)
            for item in batches:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            slots.put(e)

    thread = threading.Thread(target=work, name="medtl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def progress(loader, rank: int, desc: str, total: int | None = None):
    """A tqdm bar on an interactive terminal (rank 0 only); the plain loader otherwise."""
    if rank != 0 or not sys.stderr.isatty():
        return loader
    return tqdm(loader, desc=desc, leave=False, unit="batch", total=total)


__all__ = ["train_epoch", "cycled", "loss_sync_steps", "feature_batches", "use_prefetch", "prefetch", "progress"]
