"""Shared fixtures: tiny generated data and one tiny trained run, built once per session."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from medtl.config import load_config
from medtl.data import create_sample_data

# The tiny models trained here have a handful of test patients: their AUC intervals reach far below the page's
# quality floor, so every page would withhold its answers. The suite turns the floor off (the subprocesses it
# starts inherit this); tests/ui/test_quality.py checks the floor itself.
os.environ.setdefault("MEDTL_QUALITY_FLOOR", "0")
# The encoder feature cache (medtl.train.feature_cache) of this session only, never the user's ~/.cache: a test
# must compute what it checks (tests/train/test_feature_cache.py points it at its own folder).
os.environ["MEDTL_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="medtl-features-")

SHARED = Path(os.environ.get("MEDTL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


MUST_RUN = ("browser", "shared_data", "pacs")  # with MEDTL_NO_SKIP=1 (CI), a skip of these fails the run
_must_run_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("MEDTL_NO_SKIP") == "1" and any(m in report.keywords for m in MUST_RUN):
        _must_run_skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _must_run_skipped:
        print(
            f"\nMEDTL_NO_SKIP: {len(_must_run_skipped)} browser/real-data/PACS tests were skipped:\n  "
            + "\n  ".join(_must_run_skipped)
        )
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def restore_global_state():
    """Every test leaves threads, environment, temporary folder, working directory and read limits as
    it found them (a test that changes one cannot change the next test's outcome)."""
    import medtl.threads as threads_mod
    from medtl.io import limits

    threads, env, tmp, cwd, read = (
        torch.get_num_threads(),
        dict(os.environ),
        tempfile.tempdir,
        os.getcwd(),
        limits._current,
    )
    yield
    torch.set_num_threads(threads)
    threads_mod._FITTER = threads_mod.ThreadFitter()  # (what it fitted belongs to the test)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = tmp
    os.chdir(cwd)
    limits._current = read


@pytest.fixture(scope="session", autouse=True)
def no_leftover_reader_folders():
    """The readers' private folders (unpacked zip members: patient data) are all removed."""
    root = Path(tempfile.gettempdir())
    before = set(root.glob("medtl-read-*")) | set(root.glob("medtl-zip-*"))
    yield
    left = (set(root.glob("medtl-read-*")) | set(root.glob("medtl-zip-*"))) - before
    assert not left, f"reader folders left behind: {sorted(map(str, left))}"


def tiny_config(manifest: Path, **train):
    """A config small enough to train in seconds: 64 px inputs, one epoch per stage."""
    return load_config(
        data={"path": str(manifest), "augment": False},
        encoder={"input_size": 64},
        train={"epochs": 1, "frozen_epochs": 1, "batch_size": 8, **train},
        explain={"n_overlays": 2},
    )


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory):
    """The precision probe's answers go to a fresh folder, not the user's ~/.cache."""
    old = os.environ.get("MEDTL_CACHE_DIR")
    os.environ["MEDTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("medtl-cache"))
    yield
    if old is None:
        os.environ.pop("MEDTL_CACHE_DIR", None)
    else:
        os.environ["MEDTL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    create_sample_data(out, n_patients=16, images_per_patient=2, n_volumes=4, size=48, seed=1)
    return out


@pytest.fixture(scope="session")
def small_manifest(sample_dir, tmp_path_factory) -> Path:
    """The sample set cut to one file per patient (20 files, 10 per class: 12/4/4 after the split), for the
    runs whose cost grows with the data."""
    out = tmp_path_factory.mktemp("small")
    with open(sample_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kept = list({row["patient_id"]: row for row in reversed(rows)}.values())[::-1]  # each patient's first file
    for row in kept:
        (out / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / row["image"], out / row["image"])
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return out / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_run(sample_dir, tmp_path_factory) -> Path:
    from medtl.train import run_experiment

    return run_experiment(tiny_config(sample_dir / "manifest.csv"), tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data not found at {SHARED} (set MEDTL_SHARED_DATA)")
    return SHARED
