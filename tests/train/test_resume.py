"""Resume: a run stopped half-way and resumed ends with the same weights, bit for bit, as one never stopped; a run
whose training did not finish is refused by every command that takes a run, saying how to resume it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medtl.config import load_config
from medtl.errors import RunError
from medtl.models.checkpoint import load_model
from medtl.run import RunDir, load_saved_run
from medtl.train import resume_experiment, run_experiment
from medtl.train.tracking import RunMonitor


def resume_config(manifest, **train):
    """Two head epochs on cached features, then three of fine-tuning, with batch augmentation and mixup (their
    generators must be restored too)."""
    return load_config(
        data={"path": str(manifest), "augment": True},
        encoder={"input_size": 64},
        train={"epochs": 3, "frozen_epochs": 2, "batch_size": 8, "precision": "fp32", "mixup": 0.2, **train},
        explain={"n_overlays": 1},
    )


@pytest.fixture(scope="module")
def never_stopped(small_manifest, tmp_path_factory):
    return run_experiment(resume_config(small_manifest), tmp_path_factory.mktemp("resume") / "never_stopped")


def stop_after(epoch: int):
    """A RunMonitor.save that stops the run (as Ctrl-C would) once the checkpoint of ``epoch`` is written."""
    save = RunMonitor.save

    def stopping(self, trainer, position, *args, **kwargs):
        save(self, trainer, position, *args, **kwargs)
        if trainer.epoch == epoch:
            raise KeyboardInterrupt

    return stopping


def weights(run) -> dict:
    return load_model(RunDir(run) / RunDir.MODEL)[0].state_dict()


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def interrupted_run(cfg, out, epoch: int, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(RunMonitor, "save", stop_after(epoch))
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, out)
    return out


# 1: within the head stage (cached features); 2: at the stage boundary; 3: within fine-tuning
@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_a_resumed_run_has_the_weights_of_one_never_stopped(
    small_manifest, never_stopped, tmp_path, epoch, monkeypatch
):
    out = interrupted_run(resume_config(small_manifest), tmp_path / "run", epoch, monkeypatch)
    run = RunDir(out)
    assert run.read_status()["state"] == "interrupted" and run.read_status()["epoch"] == epoch
    assert (run / RunDir.CHECKPOINT).is_file() and not (run / RunDir.MODEL).exists()

    resume_experiment(out)

    assert_same_weights(never_stopped, out)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in json_rows(out)]
    assert history == [{k: v for k, v in row.items() if k != "seconds"} for row in json_rows(never_stopped)]
    assert run.read_status()["state"] == "finished"
    assert not (run / RunDir.CHECKPOINT).exists()  # (removed when the run finishes)
    load_saved_run(out)  # usable now


def json_rows(run) -> list[dict]:
    import csv

    with open(RunDir(run) / RunDir.HISTORY, newline="") as f:
        return list(csv.DictReader(f))


def test_an_unfinished_run_is_refused_by_the_commands_that_take_a_run(small_manifest, tmp_path, monkeypatch):
    from medtl.eval.evaluate import evaluate_run
    from medtl.export import export_run
    from medtl.predict.predictor import load_run

    out = interrupted_run(resume_config(small_manifest), tmp_path / "run", 3, monkeypatch)
    said = f"{out}: training did not finish (interrupted at epoch 3 of 5); resume it with medtl train --resume {out}"
    for use in (load_saved_run, load_run, evaluate_run, lambda r: export_run(r, tmp_path / "package")):
        with pytest.raises(RunError) as e:
            use(out)
        assert str(e.value) == said


def test_medtl_train_resume_continues_a_run_and_refuses_other_settings(small_manifest, tmp_path, monkeypatch, capsys):
    from medtl.cli import main

    out = interrupted_run(resume_config(small_manifest, epochs=1, frozen_epochs=1), tmp_path / "run", 1, monkeypatch)
    assert main(["train", "--resume", str(out), "--epochs", "4"]) == 2
    assert "leave out --epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 0
    assert "test AUC" in capsys.readouterr().out
    assert main(["train", "--resume", str(out)]) == 2
    assert "finished already" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_one_never_stopped(small_manifest, tmp_path):
    """SIGKILL of a `medtl train` process in the middle of fine-tuning (no chance to write anything), then
    `medtl train --resume`: the same weights as a run never stopped."""
    cfg = resume_config(small_manifest, epochs=12)
    config = tmp_path / "config.yaml"
    cfg.to_yaml(config)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "medtl.cli", "train", "--config", str(config)]
    subprocess.run([*command, "--out", str(tmp_path / "never_stopped")], check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(out)], env=env, stderr=subprocess.DEVNULL)
    status = out / RunDir.STATUS
    while process.poll() is None:  # kill it once an epoch of fine-tuning is checkpointed
        if status.is_file() and json.loads(status.read_text()).get("epoch", 0) >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with pytest.raises(RunError, match="training did not finish \\(interrupted at epoch"):
        RunDir.open(out)

    subprocess.run(
        [sys.executable, "-m", "medtl.cli", "train", "--resume", str(out)], check=True, env=env, capture_output=True
    )
    assert_same_weights(tmp_path / "never_stopped", out)
