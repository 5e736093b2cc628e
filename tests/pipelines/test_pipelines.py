"""The label-efficiency study on a tiny generated MedMNIST file: outputs, resume, subsampling."""

import csv
from pathlib import Path

import numpy as np
import pytest

from medtl.cli import report_errors
from medtl.config import load_config
from medtl.data import TooFewExamplesError, sample_per_class
from medtl.errors import TrainingDivergedError
from tests.data.test_sources import write_medmnist
from tests.pipelines import load_pipeline


def _fast_config(tmp_path: Path) -> Path:
    """An experiment YAML of one epoch per stage."""
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("train:\n  epochs: 1\n  frozen_epochs: 1\n  batch_size: 4\n")
    return cfg


def test_sample_per_class_takes_n_per_class_reproducibly():
    labels = [0] * 10 + [1] * 6
    a, b = sample_per_class(labels, 3, seed=1), sample_per_class(labels, 3, seed=1)
    assert a == b and len(a) == 6 and sum(labels[i] for i in a) == 3
    assert sample_per_class(labels, 3, seed=2) != a
    assert sample_per_class(labels, None, 0) == list(range(16))


def test_sample_per_class_refuses_to_shrink_a_class():
    with pytest.raises(TooFewExamplesError, match=r"7 examples per class.*class benign: 10, class malignant: 6"):
        sample_per_class([0] * 10 + [1] * 6, 7, 0, ["benign", "malignant"])


@pytest.mark.timeout(300)
def test_study_skips_a_label_count_a_class_cannot_fill(tmp_path, capsys):
    mod = load_pipeline("label_efficiency")
    npz = write_medmnist(tmp_path / "mm.npz", n=(12, 6, 6))
    cfg = _fast_config(tmp_path)
    assert (
        mod.main(
            [
                "--data",
                str(npz),
                "--out",
                str(tmp_path / "s"),
                "--n-per-class",
                "2,50",
                "--strategies",
                "linear_probe",
                "--seeds",
                "0",
                "--input-size",
                "32",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "skipped n=50 per class: 50 examples per class asked for, the data has class 0: 6, class 1: 6" in out
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [r["n_per_class"] for r in rows] == ["2"]


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    mod = load_pipeline("label_efficiency")
    missing = tmp_path / "shared" / "data" / "medmnist" / "breastmnist.npz"
    assert report_errors(mod.main, ["--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "breastmnist.npz: data not found" in err and "../shared/data" in err and "Traceback" not in err


@pytest.mark.timeout(300)
def test_3d_study_trains_a_2d_encoder_on_2_5d_and_a_3d_cnn_from_scratch(tmp_path):
    mod = load_pipeline("label_efficiency")
    npz = write_medmnist(tmp_path / "v.npz", shape=(12, 16, 16), n=(12, 6, 16))
    cfg = _fast_config(tmp_path)
    assert (
        mod.main(
            [
                "--data",
                str(npz),
                "--out",
                str(tmp_path / "s"),
                "--n-per-class",
                "all",
                "--strategies",
                "linear_probe,scratch_3d",
                "--seeds",
                "0",
                "--input-size",
                "32",
                "--volume-mode",
                "2.5d",
                "--input-size-3d",
                "16",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [r["strategy"] for r in rows] == ["linear_probe", "scratch_3d"]
    aucs = {r["strategy"]: float(r["test_auc"]) for r in rows}
    assert aucs["linear_probe"] > 0.6, aucs  # class 1 is brighter: better than chance (0.70 measured) on 16 tests
    table = (tmp_path / "s" / "results.md").read_text()
    assert f"AUC {aucs['linear_probe']:.3f}" in table  # the summary reports the rows it was given
    assert np.isfinite(aucs["scratch_3d"]) and float(rows[1]["seconds"]) > 0


def test_scratch_cells_learn_every_layer_and_batchnorm():
    mod = load_pipeline("label_efficiency")
    cfg = load_config()
    cell = mod.cell_config(cfg, "scratch", 3, "resnet10_3d", 28)
    assert not cell.encoder.pretrained and cell.train.seed == 3 and cell.train.strategy == "full"
    assert cell.train.encoder_lr_mult == 1.0 and cell.train.layer_decay == 1.0 and not cell.train.freeze_bn
    cell3 = mod.cell_config(cfg, "scratch_3d", 0, "resnet10_3d", 28)
    assert cell3.data.volume_mode == "3d" and cell3.encoder.name == "resnet10_3d" and cell3.encoder.input_size == 28
    assert mod.cell_config(cfg, "partial", 0, "resnet10_3d", 28).train.strategy == "partial"
    assert cell3.train.lr == cfg.train.lr and mod.cell_config(cfg, "scratch_3d", 0, "r", 28, 1e-3).train.lr == 1e-3
    assert mod.cell_config(cfg, "full", 0, "r", 28, 1e-3).train.lr == cfg.train.lr  # the 3D rate is for 3D only


@pytest.mark.timeout(300)
def test_a_diverged_cell_is_reported_and_the_study_goes_on(tmp_path, capsys, monkeypatch):
    mod = load_pipeline("label_efficiency")
    real = mod.run_cell

    def run_cell(cell, *args, **kwargs):
        if cell.train.strategy == "full":
            raise TrainingDivergedError("training diverged in epoch 1 (full stage): training loss nan at step 3")
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(mod, "run_cell", run_cell)
    npz = write_medmnist(tmp_path / "mm.npz", n=(12, 6, 6))
    args = [
        "--data",
        str(npz),
        "--out",
        str(tmp_path / "s"),
        "--n-per-class",
        "2",
        "--strategies",
        "linear_probe,full",
        "--seeds",
        "0",
        "--input-size",
        "32",
        "--config",
        str(_fast_config(tmp_path)),
    ]
    assert mod.main(args) == 1
    captured = capsys.readouterr()
    assert "full         n=   2 seed=0: failed, training diverged in epoch 1" in captured.out
    assert "1 cells failed" in captured.err
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [r["strategy"] for r in rows] == ["linear_probe"]  # the failed cell is not written: a resume reruns it


@pytest.mark.timeout(300)
def test_study_writes_results_and_resumes(tmp_path, capsys):
    mod = load_pipeline("label_efficiency")
    npz = write_medmnist(tmp_path / "mm.npz", n=(24, 8, 10))
    cfg = _fast_config(tmp_path)
    args = [
        "--data",
        str(npz),
        "--out",
        str(tmp_path / "study"),
        "--n-per-class",
        "3,all",
        "--strategies",
        "scratch,linear_probe",
        "--seeds",
        "0",
        "--input-size",
        "32",
        "--config",
        str(cfg),
    ]
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
    mod = load_pipeline("cross_validate")
    npz = write_medmnist(tmp_path / "mm.npz", n=(30, 6, 9))
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("encoder:\n  input_size: 32\ntrain:\n  epochs: 1\n  frozen_epochs: 1\n  batch_size: 4\n")
    assert mod.main(["--data", str(npz), "--out", str(tmp_path / "cv"), "--folds", "3", "--config", str(cfg)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "cv" / "folds.csv")))
    assert len(rows) == 3 and sum(int(r["n_test"]) for r in rows) == 45
    assert "| auc |" in (tmp_path / "cv" / "summary.md").read_text()


def test_shifts_are_deterministic_and_change_the_image():
    mod = load_pipeline("domain_shift")
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    for name in mod.SHIFTS:
        a = mod.shifted([{"image": image, "label": 0}], mod.create_shift(name))[0]["image"]
        b = mod.shifted([{"image": image, "label": 0}], mod.create_shift(name))[0]["image"]
        assert a.shape == image.shape and np.array_equal(a, b), name
        assert not np.allclose(a, image, atol=1e-3), name


@pytest.mark.timeout(300)
def test_domain_shift_study_runs_end_to_end(tmp_path):
    mod = load_pipeline("domain_shift")
    npz = write_medmnist(tmp_path / "mm.npz", n=(24, 8, 10))
    cfg = _fast_config(tmp_path)
    assert (
        mod.main(
            [
                "--data",
                str(npz),
                "--out",
                str(tmp_path / "ds"),
                "--shift",
                "gamma",
                "--k",
                "0,3",
                "--seeds",
                "0",
                "--input-size",
                "32",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "ds" / "results.csv")))
    assert [r["method"] for r in rows] == [
        "source_only",
        "adabn",
        "adabn_plain",
        "tent",
        "fine_tune",
        "adabn+fine_tune",
        "retrain",
    ]
    assert (tmp_path / "ds" / "adaptation.png").is_file()
    assert "fine_tune" in (tmp_path / "ds" / "results.md").read_text()
    # a method added later reuses the seed's source model (cached), and only its rows are added
    assert (tmp_path / "ds" / "source_model_seed0.safetensors").is_file()
    assert (
        mod.main(
            [
                "--data",
                str(npz),
                "--out",
                str(tmp_path / "ds"),
                "--shift",
                "gamma",
                "--k",
                "0",
                "--seeds",
                "0",
                "--input-size",
                "32",
                "--config",
                str(cfg),
                "--methods",
                "source_only,self_train",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "ds" / "results.csv")))
    assert [r["method"] for r in rows][-1] == "self_train" and len(rows) == 8
