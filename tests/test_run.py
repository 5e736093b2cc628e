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
