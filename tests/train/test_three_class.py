"""Three classes end to end, and what the "gradual" and "auto" strategies must do, on tiny data."""

from __future__ import annotations

import csv
import itertools
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from medtl.cli import main
from medtl.config import load_config
from medtl.train import run_experiment
from medtl.train.stages import plan_stages
from tests.conftest import tiny_config

CLASSES = ("bright", "dark", "mid")  # the folder names; an image folder's classes come sorted
LEVEL = {"dark": 40, "mid": 128, "bright": 215}  # mean grey level of each class


def _history(run) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """An image folder (one sub-folder per class, 10 grey PNGs each, classes differing in brightness and
    in a bright or dark square) trained with a linear probe."""
    root = tmp_path_factory.mktemp("three") / "images"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(10):
            img = rng.normal(LEVEL[name], 12, (40, 40))
            y, x = rng.integers(4, 24, 2)
            img[y : y + 12, x : x + 12] = 255 - LEVEL[name]  # a square of the opposite brightness (mid: none to see)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
    cfg = load_config(
        data={"path": str(root), "augment": False},
        encoder={"input_size": 64},
        train={"strategy": "linear_probe", "epochs": 4, "batch_size": 8, "precision": "fp32"},
        explain={"n_overlays": 1},
    )
    run = run_experiment(cfg, tmp_path_factory.mktemp("runs3") / "three")
    return root, run


def test_three_class_run_predicts_three_probabilities(three_class_run, capsys):
    root, run = three_class_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == list(CLASSES)
    assert np.asarray(metrics["test"]["confusion_matrix"]).shape == (3, 3)
    assert metrics["test"]["auc"] is not None  # one-vs-rest macro AUC over the three classes
    assert set(metrics["train"]["label_counts"]) == set(CLASSES)

    files = [root / name / f"{name}_00.png" for name in CLASSES]
    assert main(["predict", str(run), *map(str, files), "--json", "--device", "cpu"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [p["file"] for p in preds] == [f.name for f in files]
    for p in preds:
        assert list(p["probabilities"]) == list(CLASSES)
        assert all(0.0 <= v <= 1.0 for v in p["probabilities"].values())
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)  # no threshold for 3 classes
    # the classes are far apart in brightness: the probe must tell at least two of the three apart
    assert len({p["label"] for p in preds}) >= 2


def test_evaluate_run_with_three_classes(three_class_run, tmp_path):
    from medtl.eval.evaluate import evaluate_run
    from medtl.predict.predictor import load_run

    _, trained = three_class_run
    run = tmp_path / "three"
    shutil.copytree(trained, run)  # evaluate writes into the run (evaluation/): keep the module's run as it was
    result = evaluate_run(run, n_boot=20, methods=(), data_randomisation=False, device="cpu")
    assert result["class_names"] == list(CLASSES)
    auc = result["auc"]
    assert auc["auc"] is not None and 0.0 <= auc["auc"] <= 1.0  # macro one-vs-rest AUC
    assert auc["n_boot"] == 20
    assert "operating_point" not in result  # thresholds are for binary tasks only
    assert result["calibration"]["temperature"] > 0
    assert result["saliency_sanity"] == []  # no method asked for
    out = run / "evaluation"
    assert (out / "report.html").stat().st_size > 0
    written = json.loads((out / "evaluation.json").read_text())
    assert written["auc"]["auc"] == pytest.approx(auc["auc"])
    assert not (out / "confusion.png").exists() and not (out / "roc.png").exists()  # binary-only figures
    predictor = load_run(run, device="cpu", decision="evaluation")
    assert predictor.decision.temperature == pytest.approx(result["calibration"]["temperature"])
    assert predictor.decision.threshold is None and predictor.decision.basis == "argmax"


def test_gradual_unfreezes_encoder_groups_in_stages(small_manifest, tmp_path, monkeypatch):
    """Every stage of "gradual" trains more of the encoder than the one before (counted by the trainable
    parameters while each stage runs), from the top group down."""
    import importlib

    import timm
    from safetensors.torch import save_file

    from medtl.models.groups import encoder_groups, head_parameters

    # resnet18 (5 layer groups) with a local weight file: a pretrained run, so the strategy is kept
    weights = tmp_path / "resnet18.safetensors"
    save_file(
        {
            k: v.contiguous()
            for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()
            if not k.startswith("fc.")
        },
        str(weights),
    )
    trainer_module = importlib.import_module("medtl.train.trainer")
    seen = []  # per stage: (its name, the trainable parameters while it ran, each encoder group's and the head's size)
    run_stage = trainer_module.Trainer.run_stage

    def recording(trainer, stage):
        run_stage(trainer, stage)
        model = trainer.model
        seen.append(
            (
                stage.name,
                sum(p.numel() for p in model.parameters() if p.requires_grad),
                [sum(p.numel() for p in g) for g in encoder_groups(model)],
                sum(p.numel() for p in head_parameters(model)),
            )
        )

    monkeypatch.setattr(trainer_module.Trainer, "run_stage", recording)
    cfg = load_config(
        data={"path": str(small_manifest), "augment": False},
        encoder={"name": "resnet18", "weights_file": str(weights), "input_size": 64},
        train={"strategy": "gradual", "frozen_epochs": 0, "epochs": 2, "batch_size": 8, "precision": "fp32"},
        explain={"n_overlays": 0},
    )
    run = run_experiment(cfg, tmp_path / "gradual")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "gradual"
    stages = [row["stage"] for row in _history(run)]
    assert len(stages) >= 2 and stages[:2] == ["unfreeze_1", "unfreeze_2"]
    assert stages == sorted(stages, key=lambda s: int(s.split("_")[1]))  # unfrozen top-down, never re-frozen
    assert [name for name, *_ in seen] == stages  # one history row per stage (one epoch each)
    trainable = [n for _, n, _, _ in seen]
    assert all(b > a for a, b in itertools.pairwise(trainable)), trainable  # the trainable set grows every stage
    _, _, sizes, head = seen[0]
    assert trainable[0] == head + sizes[-1]  # first stage: the head and the top layer group only
    assert trainable[1] == head + sizes[-1] + sizes[-2]  # then the group below it too


def test_gradual_plan_keeps_the_epoch_budget():
    """(It planned one epoch per layer group whatever train.epochs said: epochs=2 gave 7.)"""
    cfg = load_config(train={"strategy": "gradual", "frozen_epochs": 1, "epochs": 2}).train
    stages = plan_stages(cfg, 8)  # efficientnet_lite0 has 8 layer groups
    assert sum(s.epochs for s in stages) == cfg.frozen_epochs + cfg.epochs


def test_auto_strategy_is_resolved_and_explained(small_manifest, tmp_path):
    run = run_experiment(
        tiny_config(small_manifest, strategy="auto", precision="fp32", auto_candidates=["linear_probe", "partial"]),
        tmp_path / "auto",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    strategy, reason = metrics["strategy"], metrics["strategy_reason"]
    assert strategy in ("linear_probe", "partial")
    scores = {c: v["val_score"] for c, v in metrics["auto_candidates"].items()}
    assert list(scores) == ["linear_probe", "partial"] and scores[strategy] == max(scores.values())
    assert reason.startswith("chosen on validation among linear_probe")
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["strategy"] == "auto"  # what was asked ...
    assert resolved["resolved"]["strategy"] == strategy  # ... and what it became, with why
    assert resolved["resolved"]["strategy_reason"] == reason
    stages = {row["stage"] for row in _history(run)}  # every candidate's epochs, by candidate
    assert stages == {"linear_probe:head", "partial:head", "partial:partial"}
