"""The run folder's one owner: file names, schema version and migrations, checksums, artefacts written once."""

import shutil

import pytest
import yaml

from medtl.config import SCHEMA_VERSION
from medtl.errors import RunError, RunExistsError
from medtl.predict.predictor import load_run
from medtl.run import RunDir, load_saved_run


def test_a_new_run_refuses_a_folder_that_holds_files_unless_forced(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "note.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="--force"):
        RunDir.create(tmp_path / "r")
    assert (tmp_path / "r" / "note.txt").is_file()
    assert not any(RunDir.create(tmp_path / "r", force=True).path.iterdir())
    with pytest.raises(RunError, match="not a medtl run"):
        RunDir.open(tmp_path / "r")


def test_a_run_records_its_schema_and_checksums_its_weights(tiny_run):
    run = RunDir.open(tiny_run)
    assert yaml.safe_load((run / RunDir.CONFIG).read_text())["schema_version"] == SCHEMA_VERSION
    assert set(run.checksums()) >= {RunDir.MODEL, RunDir.OOD}
    run.verify()


def test_a_changed_weight_file_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = bytearray((run / RunDir.MODEL).read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (run / RunDir.MODEL).write_bytes(bytes(data))
    with pytest.raises(RunError, match="model.safetensors does not match its sha256"):
        load_run(run)


def test_a_version_1_run_is_migrated_when_read(tiny_run, tmp_path):
    """Runs saved before schema_version (version 1) and before colour was kept were fed luminance."""
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    raw = yaml.safe_load((run / RunDir.CONFIG).read_text())
    del raw["schema_version"], raw["data"]["color"]
    (run / RunDir.CONFIG).write_text(yaml.safe_dump(raw))
    assert load_saved_run(run).config.data.color == "grey"
    raw["schema_version"] = SCHEMA_VERSION + 1
    (run / RunDir.CONFIG).write_text(yaml.safe_dump(raw))
    with pytest.raises(RunError, match="schema_version"):
        load_saved_run(run)


def test_asking_for_the_evaluation_decision_of_an_unevaluated_run_says_what_to_do(tiny_run):
    with pytest.raises(RunError, match="medtl evaluate"):
        load_run(tiny_run, decision="evaluation")


@pytest.mark.parametrize("text", [b"data: [unclosed\n", b"\xff\xfe not text", b"- a list\n"])
def test_a_damaged_config_is_a_typed_error_naming_the_file(tiny_run, tmp_path, text):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / RunDir.CONFIG).write_bytes(text)
    with pytest.raises(RunError, match="config.yaml"):
        load_saved_run(run)


def status_run(tmp_path, tiny_run, **status):
    """A copy of the tiny run whose status.json says ``status``."""
    import json

    run = RunDir(shutil.copytree(tiny_run, tmp_path / "r"))
    (run / RunDir.STATUS).write_text(json.dumps(status))
    return run


@pytest.mark.parametrize(
    "status, said",
    [
        ({"state": "interrupted", "epoch": 3, "epochs": 10}, "training did not finish (interrupted at epoch 3 of 10)"),
        ({"state": "failed", "epoch": 0, "error": "MemoryError"}, "(failed before its first epoch ended: MemoryError)"),
        # a process that is gone (killed without a word) left "running": interrupted
        (
            {"state": "running", "epoch": 2, "epochs": 4, "pid": 2**22 + 1},
            "did not finish (interrupted at epoch 2 of 4)",
        ),
    ],
)
def test_an_unfinished_run_is_refused_saying_where_it_stopped_and_how_to_resume(tmp_path, tiny_run, status, said):
    import socket

    run = status_run(tmp_path, tiny_run, host=socket.gethostname(), **status)
    with pytest.raises(RunError) as e:
        load_run(run.path)
    assert said in str(e.value) and str(e.value).endswith(f"resume it with medtl train --resume {run.path}")


def test_a_run_still_training_is_refused_as_running(tmp_path, tiny_run):
    import os
    import socket

    parent = os.getppid()  # (a live process other than this one)
    run = status_run(tmp_path, tiny_run, state="running", epoch=1, epochs=5, pid=parent, host=socket.gethostname())
    with pytest.raises(RunError, match="training is still running \\(at epoch 1 of 5\\)"):
        RunDir.open(run.path)
    with pytest.raises(RunError, match="still running"):
        RunDir.for_resume(run.path)


def test_a_damaged_status_file_is_a_typed_error_naming_it(tmp_path, tiny_run):
    run = RunDir(shutil.copytree(tiny_run, tmp_path / "r"))
    (run / RunDir.STATUS).write_text("{not json")
    with pytest.raises(RunError, match="status.json: not a status record"):
        RunDir.open(run.path)
