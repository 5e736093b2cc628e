"""Following a run: TensorBoard's reader and MLflow's client read the curves of a stopped-and-resumed run back,
each epoch once; train.log holds the terminal's lines with timestamps; the epoch lines say the time left."""

from __future__ import annotations

import pytest

from medtl.run import RunDir
from medtl.train import resume_experiment
from tests.train.test_resume import interrupted_run, resume_config


@pytest.fixture(scope="module")
def resumed(small_manifest, tmp_path_factory):
    """A run (TensorBoard and MLflow) stopped after epoch 3 of 5, then resumed."""
    mp = pytest.MonkeyPatch()
    try:
        cfg = resume_config(small_manifest, tracking="both")
        out = interrupted_run(cfg, tmp_path_factory.mktemp("tracking") / "run", 3, mp)
    finally:
        mp.undo()
    resume_experiment(out)
    return RunDir(out)


def test_tensorboard_reads_each_epoch_once_across_the_resume(resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed / RunDir.TENSORBOARD))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "auc/val", "lr/group0", "test/auc"} <= tags
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2, 3, 4, 5]
    fine_tune_lrs = [e.value for e in events.Scalars("lr/group1")]  # (the encoder's group: fine-tuning only)
    assert len(fine_tune_lrs) == 3 and fine_tune_lrs[-1] < fine_tune_lrs[0]  # the cosine schedule went on


def test_mlflow_reads_the_run_back_as_one_run(resumed):
    from mlflow.tracking import MlflowClient

    status = resumed.read_status()
    client = MlflowClient(tracking_uri=status["mlflow_uri"])
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.strategy"] == "fine_tune"
    history = client.get_metric_history(run.info.run_id, "auc/val")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert "test/auc" in run.data.metrics


def test_train_log_holds_the_terminal_lines_with_timestamps(resumed):
    log = (resumed / RunDir.TRAIN_LOG).read_text()
    assert "medtl.train: epoch 3/5 [fine_tune]" in log and "medtl.train: epoch 5/5 [fine_tune]" in log
    assert "resumed after epoch 3 of 5" in log
    assert "left" in log.split("epoch 1/5 [head]")[1].splitlines()[0]  # the whole run's time left
    first = log.splitlines()[0]
    assert first[:4].isdigit() and first[4] == "-"  # 2026-...
