"""``medtl runs``: a table comparing the runs of a folder, read from their saved files."""

from __future__ import annotations

import json
import shutil

from medtl.cli import main
from medtl.run import RunDir


def test_the_table_compares_finished_and_unfinished_runs(tiny_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "study" / "a")
    b = RunDir(shutil.copytree(tiny_run, runs / "b"))
    (b / RunDir.MODEL).unlink()
    (b / RunDir.STATUS).write_text(json.dumps({"state": "interrupted", "epoch": 1, "epochs": 2}))
    (runs / "notes").mkdir()  # (not a run: left out)

    assert main(["runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0].split(), {line.split()[0]: line.split() for line in lines[1:3]}
    assert header[:6] == ["run", "status", "encoder", "strategy", "size", "labels"]
    metrics = RunDir(tiny_run).read_json(RunDir.METRICS)
    a = rows["study/a"]
    assert a[1:6] == ["finished", "efficientnet_lite0", metrics["strategy"], "64", str(metrics["train"]["n_images"])]
    assert a[6] == f"{metrics['test']['auc']:.3f}" and a[7].startswith("(") and a[7].endswith(")~")
    assert a[8] == f"{metrics['seconds']:.0f}"
    assert rows["b"][1:3] == ["interrupted", "1/2"]
    assert lines[3].startswith("~ approximate interval")


def test_a_folder_without_runs_says_so(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out
    assert main(["runs", str(tmp_path / "missing")]) == 2
