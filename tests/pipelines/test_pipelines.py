"""The label-efficiency study on a tiny generated MedMNIST file: outputs, resume, subsampling."""

import csv
import importlib.util
from pathlib import Path

import pytest

from tests.data.test_sources import write_medmnist

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str = "label_efficiency"):
    """A pipeline script imported as a module (pipelines/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_subsample_takes_n_per_class_reproducibly():
    mod = _load()
    labels = [0] * 10 + [1] * 6
    a, b = mod.subsample(labels, 3, seed=1), mod.subsample(labels, 3, seed=1)
    assert a == b and len(a) == 6 and sum(labels[i] for i in a) == 3
    assert mod.subsample(labels, 3, seed=2) != a
    assert mod.subsample(labels, None, 0) == list(range(16))


@pytest.mark.timeout(300)
def test_study_writes_results_and_resumes(tmp_path, capsys):
    mod = _load()
    npz = write_medmnist(tmp_path / "mm.npz", n=(24, 8, 10))
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("train:\n  epochs: 1\n  frozen_epochs: 1\n  batch_size: 4\n")
    args = ["--data", str(npz), "--out", str(tmp_path / "study"), "--n-per-class", "3,all",
            "--strategies", "scratch,linear_probe", "--seeds", "0", "--input-size", "32", "--config", str(cfg)]
    assert mod.main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "study" / "results.csv")))
    assert len(rows) == 4 and set(rows[0]) == set(mod.FIELDS)
    assert (tmp_path / "study" / "learning_curve.png").is_file()
    assert "linear_probe" in (tmp_path / "study" / "results.md").read_text()
    capsys.readouterr()
    assert mod.main(args) == 0  # nothing left to run: resumed, not redone
    assert "4 cells done, 0 to run" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(tmp_path / "study" / "results.csv")))) == 4


@pytest.mark.timeout(300)
def test_cross_validation_tests_every_image_once(tmp_path):
    mod = _load("cross_validate")
    npz = write_medmnist(tmp_path / "mm.npz", n=(30, 6, 9))
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("encoder:\n  input_size: 32\ntrain:\n  epochs: 1\n  frozen_epochs: 1\n  batch_size: 4\n")
    assert mod.main(["--data", str(npz), "--out", str(tmp_path / "cv"), "--folds", "3", "--config", str(cfg)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "cv" / "folds.csv")))
    assert len(rows) == 3 and sum(int(r["n_test"]) for r in rows) == 45
    assert "| auc |" in (tmp_path / "cv" / "summary.md").read_text()


def test_shifts_are_deterministic_and_change_the_image():
    import numpy as np

    mod = _load("domain_shift")
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    for name in mod.SHIFTS:
        a = mod.shifted([{"image": image, "label": 0}], mod.create_shift(name))[0]["image"]
        b = mod.shifted([{"image": image, "label": 0}], mod.create_shift(name))[0]["image"]
        assert a.shape == image.shape and np.array_equal(a, b), name
        assert not np.allclose(a, image, atol=1e-3), name


@pytest.mark.timeout(300)
def test_domain_shift_study_runs_end_to_end(tmp_path):
    mod = _load("domain_shift")
    npz = write_medmnist(tmp_path / "mm.npz", n=(24, 8, 10))
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("train:\n  epochs: 1\n  frozen_epochs: 1\n  batch_size: 4\n")
    assert mod.main(["--data", str(npz), "--out", str(tmp_path / "ds"), "--shift", "gamma", "--k", "0,3",
                     "--seeds", "0", "--input-size", "32", "--config", str(cfg)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "ds" / "results.csv")))
    assert [r["method"] for r in rows] == ["source_only", "fine_tune", "retrain"]
    assert (tmp_path / "ds" / "adaptation.png").is_file() and "fine_tune" in (tmp_path / "ds" / "results.md").read_text()
