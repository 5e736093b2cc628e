"""Encoder features computed once and kept on disk, for the strategies that train on a frozen encoder.

A linear probe, the closed-form heads (``logreg``, ``ncm``), the first stage of LP-FT, the learning-rate
finder and the out-of-distribution detector of a frozen-encoder run all read the encoder's pooled features of
the same inputs. With a big encoder (a ViT-B at 518 px runs a few images a second on a CPU) computing them
is nearly the whole cost of a study, so they are stored, keyed by what determines them:

* the encoder's weights (sha256 of every tensor but the head's — pretrained or fine-tuned alike),
* the inputs themselves (sha256 of the model-ready image tensors and their labels: the preprocessing, the
  files and the split are all in them),
* the precision and device type of the forward pass.

A second study on the same data with the same encoder then reads them in seconds. The cache lives in
``$MEDTL_FEATURE_CACHE`` (default ``~/.cache/medtl/features``; ``off`` disables it); its files are the
features of patients' images, so its folder is private to the user (0700, files 0600). Entries are written
atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medtl.data.dataset import iterate_batches
from medtl.predict.forward import extract_features
from medtl.progress import Steps
from medtl.runtime import Runtime

log = logging.getLogger("medtl.train")
FORMAT = "1"


def cache_root() -> Path | None:
    """The feature cache's folder (``MEDTL_FEATURE_CACHE``, default ``~/.cache/medtl/features``); None when off."""
    where = os.environ.get("MEDTL_FEATURE_CACHE", "")
    if where.lower() in ("off", "0", "none", "false"):
        return None
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(where or os.path.join(xdg, "medtl", "features")))


def encoder_digest(model: torch.nn.Module) -> str:
    """sha256 of the encoder's tensors (names, shapes, dtypes and values), the head's left out."""
    head = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]  # timm's interface
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in head:
            continue
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def inputs_digest(dataset, batch_size: int) -> str:
    """sha256 of every model-ready input and label of ``dataset``, in its order."""
    h = hashlib.sha256()
    for batch in iterate_batches(dataset, batch_size, "cpu"):
        for key in ("image", "label"):
            t = batch[key].contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_key(model: torch.nn.Module, dataset, runtime: Runtime, batch_size: int) -> str:
    parts = {
        "format": FORMAT,
        "encoder": model.pretrained_cfg.get("medtl_encoder", type(model).__name__),
        "weights": encoder_digest(model),
        "inputs": inputs_digest(dataset, batch_size),
        "precision": runtime.precision,
        "device": runtime.device.type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_features(
    model: torch.nn.Module, dataset, runtime: Runtime | None = None, batch_size: int = 32, root: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`medtl.predict.forward.extract_features`, read from the feature cache when these weights have
    already seen these inputs, else computed and stored there (``root``: the cache folder, default
    :func:`cache_root`)."""
    runtime = Runtime.of(model, runtime)
    root = root if root is not None else cache_root()
    if root is None:
        return extract_features(model, dataset, runtime, batch_size)
    t0 = time.perf_counter()
    path = root / f"{feature_key(model, dataset, runtime, batch_size)}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            log.info(
                "encoder features of %d inputs read from the cache in %.1fs",
                len(stored["features"]),
                time.perf_counter() - t0,
            )
            return stored["features"].to(runtime.device), stored["labels"].to(runtime.device)
        except Exception as e:  # a damaged entry is computed again and replaced
            log.warning(
                "feature cache entry %s unreadable (%s): computing the features again", path.name, type(e).__name__
            )
    steps = Steps("encoder features", len(dataset), log, unit="inputs")  # a line every 10 s, with the time left
    features, labels = extract_features(model, dataset, runtime, batch_size, progress=steps)
    _store(path, features, labels)
    return features, labels


def _store(path: Path, features: torch.Tensor, labels: torch.Tensor) -> None:
    tmp = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # created 0600
        os.close(fd)
        tensors = {"features": features.detach().cpu().contiguous(), "labels": labels.detach().cpu().contiguous()}
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the cache, not the run
        log.warning("encoder features not cached (%s: %s)", type(e).__name__, e.strerror or "")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


__all__ = ["cached_features", "cache_root", "encoder_digest", "inputs_digest", "feature_key"]
