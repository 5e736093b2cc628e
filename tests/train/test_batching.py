"""Batch size "auto" (each branch forced, GPU included, on any machine), learning-rate scaling, loader
workers, and the batch record a run keeps; GPU-only checks run where a GPU is."""

import dataclasses
import importlib
import json

import pytest
import torch

from medtl.config import load_config
from medtl.errors import ConfigError
from medtl.train import fit, run_experiment
from medtl.train.batching import REFERENCE_BATCH, auto_batch_size, loader_workers, resolve_batch, scaled_lr
from tests.conftest import tiny_config

CUDA = torch.device("cuda")  # a device name only: nothing here touches a GPU unless one is there
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_batch_on_a_cpu_is_the_reference_batch():
    b, rule = auto_batch_size(10_000, torch.device("cpu"), fits=lambda b: True)
    assert b == REFERENCE_BATCH == 8 and "CPU" in rule


def test_auto_batch_on_a_gpu_takes_the_largest_that_fits_and_keeps_8_steps_per_epoch():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 64  # a card whose memory holds batches of 64, not 128

    assert auto_batch_size(100_000, CUDA, fits)[0] == 64 and tried == [256, 128, 64]
    assert auto_batch_size(546, CUDA, lambda b: True)[0] == 64  # BreastMNIST: 546 // 64 = 8 steps
    assert auto_batch_size(100, CUDA, lambda b: True)[0] == 8  # 100 // 16 = 6 steps: too few
    assert auto_batch_size(100_000, CUDA, lambda b: False)[0] == 8  # nothing larger fits


def test_learning_rate_scales_with_the_square_root_of_the_batch():
    assert scaled_lr(3e-3, 8) == 3e-3
    assert scaled_lr(3e-3, 32) == pytest.approx(6e-3)
    assert scaled_lr(1e-3, 128) == pytest.approx(4e-3)


def test_resolve_batch_on_a_forced_gpu_scales_the_rate_and_says_why(monkeypatch):
    fit_mod = importlib.import_module("medtl.train.batching")

    monkeypatch.setattr(fit_mod, "auto_batch_size", lambda n, device, fits, world=1: (32, "32: the largest that fits"))
    cfg = load_config(train={"batch_size": "auto", "lr": 2e-3}).train
    ds = [{"image": torch.zeros(3, 8, 8)}] * 400
    model = torch.nn.Linear(1, 1)
    resolved, record = resolve_batch(cfg, model, ds, CUDA)
    assert resolved.batch_size == 32 and resolved.lr == pytest.approx(4e-3)
    assert record["batch_size"] == 32 and "sqrt(32/8)" in record["rule"]
    fixed, record = resolve_batch(load_config(train={"batch_size": 16}).train, model, ds, CUDA)
    assert fixed.batch_size == 16 and record["rule"] == "set in the configuration"


def test_loader_workers(monkeypatch):
    fit_mod = importlib.import_module("medtl.train.batching")

    monkeypatch.setattr(fit_mod, "usable_cores", lambda: 16)
    assert loader_workers("auto", torch.device("cpu")) == 0  # the cores belong to the model
    assert loader_workers("auto", CUDA) == 8
    monkeypatch.setattr(fit_mod, "usable_cores", lambda: 2)
    assert loader_workers("auto", CUDA) == 1
    assert loader_workers(3, torch.device("cpu")) == 3


@pytest.mark.parametrize(
    "train, match",
    [
        ({"batch_size": "big"}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"workers": -1}, "workers"),
        ({"workers": "many"}, "workers"),
    ],
)
def test_batch_and_worker_settings_are_checked(train, match):
    with pytest.raises(ConfigError, match=match):
        load_config(train=train)


def test_auto_batch_run_records_the_rule(small_manifest, tmp_path):
    cfg = tiny_config(small_manifest, batch_size="auto", workers=1, strategy="full", frozen_epochs=0)
    run = run_experiment(
        dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, n_overlays=0)), tmp_path / "run"
    )
    metrics = json.loads((run / "metrics.json").read_text())
    expected = 8 if not torch.cuda.is_available() else metrics["batch"]["batch_size"]
    assert metrics["batch"]["batch_size"] == expected and metrics["batch"]["lr"] == pytest.approx(
        scaled_lr(cfg.train.lr, expected)
    )
    assert "batch" in (run / "config.yaml").read_text()


@needs_gpu
def test_on_a_gpu_the_store_moves_to_the_device_and_training_stays_there(tiny_data_gpu):
    train, val, cfg = tiny_data_gpu
    model = __import__("medtl.models", fromlist=["create_encoder"]).create_encoder("efficientnet_lite0", num_classes=2)
    result = fit(model, train, val, dataclasses.replace(cfg.train, device="cuda", epochs=1), num_classes=2)
    assert result.device.startswith("cuda") and train.store().images.device.type == "cuda"
    assert next(model.parameters()).device.type == "cuda"


@pytest.fixture
def tiny_data_gpu(small_manifest):
    from medtl.models import create_encoder, resolve_preprocessing
    from medtl.train import prepare_data

    cfg = tiny_config(small_manifest)
    pre = resolve_preprocessing(create_encoder("efficientnet_lite0", pretrained=False), 64)
    train, val, _ = prepare_data(cfg.data, pre, 0).datasets(cfg.data, pre)
    return train, val, cfg


def _toy_epoch(sync_every, stop_at=None):
    from medtl.train.loop import train_epoch

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(10, 8, 4)
    seen = []

    def on_loss(losses):
        seen.append(len(losses))
        return stop_at is not None and len(losses) >= stop_at

    losses = train_epoch(iter(x), lambda b: layer(b).pow(2).mean(), opt, on_loss=on_loss, sync_every=sync_every)
    return losses, seen, layer.weight.detach().clone()


def test_losses_read_every_few_steps_are_the_same_losses_and_still_stop_training():
    """The GPU branch (losses read every 16 steps, see loss_sync_steps) forced on the CPU with 4."""
    from medtl.train.loop import loss_sync_steps

    assert loss_sync_steps(torch.device("cpu")) == 1 and loss_sync_steps(CUDA) == 16
    every, seen1, w1 = _toy_epoch(1)
    grouped, seen4, w4 = _toy_epoch(4)
    assert grouped == every and seen4 == seen1 == list(range(1, 11)) and torch.equal(w1, w4)
    stopped, _, _ = _toy_epoch(4, stop_at=3)  # a stop is seen at the next read: 4 steps ran, 3 losses judged
    assert len(stopped) == 3


def test_auto_batch_under_torchrun_counts_per_process_batches_and_rounds_to_the_processes():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 64

    # 2 GPUs: each process holds 64, so the global batch is 128 (and 100000 // 128 leaves 8 steps)
    assert auto_batch_size(100_000, CUDA, fits, world=2)[0] == 128 and tried == [256, 128, 64]
    assert auto_batch_size(100_000, torch.device("cpu"), fits, world=3)[0] == 9  # a multiple of 3 near 8


def test_only_allocation_failures_count_as_not_fitting():
    from medtl.train.batching import _out_of_memory

    assert _out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not _out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
