"""Compute threads fitted to the cores this process may use: cgroup quotas (v2 and v1), affinity, other processes
competing for the cores, and the overrides. Every branch is forced here, whatever the host."""

import os
import subprocess
import sys

import pytest
import torch

import medtl.threads as threads_mod
from medtl.errors import ConfigError
from medtl.threads import ThreadFitter, busy_elsewhere, choose_threads, cpu_quota, usable_cores

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture
def no_overrides(monkeypatch):
    monkeypatch.delenv("MEDTL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # torch's start-up count, as a fresh process has it: a session fixture that trained (tiny_run) may have left
    # the count it fitted on a busy machine, which a new fitter would take for the program's own choice
    torch.set_num_threads(threads_mod.INITIAL_THREADS)


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "400000 100000\n"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quotas_v2_and_v1_are_read(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == quota
    expected = AFFINITY if quota is None else max(1, min(AFFINITY, int(quota)))
    assert usable_cores(tmp_path) == expected


def test_a_simulated_quota_of_one_core_gives_one_thread(tmp_path, monkeypatch, no_overrides):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setattr(threads_mod, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(threads_mod, "_allowed_cpus", lambda: list(range(8)))  # an 8-core affinity mask
    assert usable_cores() == 1
    fitter = ThreadFitter()
    choice = fitter.fit(measure=False)
    assert choice.threads == 1 and torch.get_num_threads() == 1
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    assert fitter.fit(measure=False).threads == 3 and torch.get_num_threads() == 3


@pytest.mark.parametrize(
    "cores, busy, threads",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 0.6, 1), (2, 7.0, 1), (1, 3.0, 1), (16, 3.2, 13), (16, 0.0, 16)],
)
def test_threads_leave_the_cores_other_processes_use(cores, busy, threads, no_overrides):
    assert choose_threads(cores, busy).threads == threads


def test_overrides_win_and_a_bad_one_is_a_typed_error(monkeypatch, no_overrides):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(8, 0.0).threads == 1
    monkeypatch.setenv("MEDTL_THREADS", "3")
    assert choose_threads(8, 5.0).threads == 3
    for bad in ("many", "0", "-2"):
        monkeypatch.setenv("MEDTL_THREADS", bad)
        with pytest.raises(ConfigError, match="MEDTL_THREADS"):
            choose_threads()


def test_a_competing_process_is_measured_and_takes_a_thread(monkeypatch, no_overrides):
    """A real CPU-bound process on this process's cores: measured busy, and the fitter leaves it its core."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, os.sched_getaffinity(0))
        busy = busy_elsewhere(0.5)
        assert busy >= 0.6
        monkeypatch.setattr(threads_mod, "_allowed_cpus", lambda: [0, 1])
        monkeypatch.setattr(threads_mod, "busy_elsewhere", lambda window=0.1: busy)
        assert ThreadFitter().fit().threads == 1 and torch.get_num_threads() == 1
    finally:
        hog.kill()
        hog.wait()


def test_the_fitter_measures_at_most_every_interval(monkeypatch, no_overrides):
    calls = []
    monkeypatch.setattr(threads_mod, "busy_elsewhere", lambda window=0.1: calls.append(1) or 0.0)
    fitter = ThreadFitter(every=3600)
    for _ in range(5):
        fitter.fit()
    fitter.fit(measure=False)
    assert len(calls) == 1
    monkeypatch.setenv("MEDTL_THREADS", "1")  # read at every call, not cached with the measurement
    assert fitter.fit().threads == 1 and torch.get_num_threads() == 1


def test_training_fits_the_threads_each_epoch(monkeypatch, sample_dir, no_overrides):
    from medtl.config import load_config
    from medtl.data import read_dataset
    from medtl.models import create_encoder, resolve_preprocessing
    from medtl.train import fit, prepare_data

    seen = []
    real = threads_mod.fit_threads
    monkeypatch.setattr("medtl.train.trainer.fit_threads", lambda measure=True: seen.append(measure) or real(measure))
    monkeypatch.setenv("MEDTL_THREADS", "1")
    cfg = load_config(
        data={"path": str(sample_dir / "manifest.csv"), "augment": False},
        encoder={"input_size": 32},
        train={"epochs": 2, "frozen_epochs": 1, "batch_size": 8, "deterministic": True},
    )
    model = create_encoder("efficientnet_lite0", num_classes=2, pretrained=False)
    pre = resolve_preprocessing(model, 32)
    train, val, _ = prepare_data(cfg.data, pre, 0, read_dataset(sample_dir / "manifest.csv")).datasets(cfg.data, pre)
    fit(model, train, val, cfg.train, 2)
    assert seen == [False, False, False]  # 3 epochs; a deterministic run keeps a fixed count (no measurement)
    assert torch.get_num_threads() == 1


def test_a_count_the_program_set_itself_is_left_alone(monkeypatch, no_overrides):
    monkeypatch.setattr(threads_mod, "busy_elsewhere", lambda window=0.1: 0.0)
    monkeypatch.setattr(threads_mod, "INITIAL_THREADS", 4)  # torch's start-up count
    monkeypatch.setattr(threads_mod, "_allowed_cpus", lambda: [0, 1])
    torch.set_num_threads(4)
    fitter = ThreadFitter()
    assert fitter.fit().threads == 2 and torch.get_num_threads() == 2  # the start-up count is fitted
    torch.set_num_threads(3)  # the program's own choice
    choice = fitter.fit()
    assert choice.threads == 3 and "set by the program" in choice.reason and torch.get_num_threads() == 3
