"""Batch prediction: inputs found and grouped into studies, one CSV row each with no paths or names,
predictions equal to one-by-one ones, errors and refusals reported without stopping, and a run
killed half-way resumed without a duplicate row."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from medtl.predict.batch import find_inputs, predict_to_csv
from medtl.predict.predictor import load_run


def _archive(sample_dir: Path, root: Path) -> Path:
    """A PACS-export-like tree: one study's two series in folders of their own (under a patient's name),
    two other single-file studies, a NIfTI volume, a text file and a damaged DICOM file."""
    files = sorted((sample_dir / "dicom").glob("*.dcm"))
    files = [files[0], files[1], files[2], files[4]]  # (the sample set has 2 images per patient, one study each)
    for k, (src, folder) in enumerate(zip(files, ["Doe^John/series1", "Doe^John/series2", "other", "other"])):
        ds = pydicom.dcmread(src)
        if k < 2:
            ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1511.42"
        target = root / folder / f"IM{k:04d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    shutil.copy(sorted((sample_dir / "nifti").glob("*.nii.gz"))[0], root / "other" / "vol.nii.gz")
    (root / "other" / "notes.txt").write_text("not an image")
    (root / "other" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return root


def test_inputs_are_grouped_into_studies_across_folders(sample_dir, tmp_path):
    root = _archive(sample_dir, tmp_path / "archive")
    with find_inputs([root], recursive=True) as inputs:
        keys = [i.key for i in inputs]
        study = [i for i in inputs if i.path.is_dir()]
        assert len(study) == 1 and len(list(study[0].path.iterdir())) == 2  # the two series, one study
        assert len(inputs) == 5  # the study, 2 single-file studies, the volume, the damaged file (not notes.txt)
        assert len(set(keys)) == 5 and not any("Doe" in k or "IM0" in k for k in keys)
        folder = study[0].path
    assert not folder.exists()  # the private links are removed with the list


def test_csv_rows_match_one_by_one_predictions_and_hold_no_paths(tiny_run, sample_dir, tmp_path):
    root = _archive(sample_dir, tmp_path / "archive")
    predictor = load_run(tiny_run, device="cpu", bounded=True)
    out = tmp_path / "out.csv"
    with find_inputs([root], recursive=True) as inputs:
        counts = predict_to_csv(predictor, inputs, out, batch_size=3)
        single = {i.key: predictor.predict(i.path) for i in inputs if not i.path.name.startswith("broken")}
    assert counts["errors"] == 1 and counts["answered"] + counts["refused"] == 4 and counts["skipped"] == 0
    text = out.read_text()
    assert "Doe" not in text and "IM000" not in text and "broken" not in text and str(tmp_path) not in text
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows].count("error") == 1
    for r in rows:
        if r["status"] == "answered":
            p = single[r["input"]].probabilities
            assert all(abs(float(r[f"p_{c}"]) - v) < 1e-5 for c, v in p.items())
            assert len(r["study_key"]) == (10 if r["input"].startswith("study-") else 0)  # none for the NIfTI
    with find_inputs([root], recursive=True) as inputs:
        again = predict_to_csv(predictor, inputs, out)
    assert again["skipped"] == 5 and again["answered"] == again["errors"] == 0  # nothing written twice
    assert len(list(csv.DictReader(out.open()))) == 5


def test_a_row_cut_off_by_a_kill_is_redone(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run, device="cpu")
    files = sorted((sample_dir / "dicom").glob("*.dcm"))[:4]
    out = tmp_path / "out.csv"
    predict_to_csv(predictor, find_inputs(files[:2]), out)
    out.write_bytes(out.read_bytes()[:-7])  # the last row cut off mid-write
    counts = predict_to_csv(predictor, find_inputs(files), out)
    assert counts["skipped"] == 1 and counts["answered"] + counts["refused"] == 3
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and len({r["input"] for r in rows}) == 4


def test_the_command_killed_half_way_resumes(tiny_run, sample_dir, tmp_path):
    files = [str(f) for f in sorted((sample_dir / "dicom").glob("*.dcm"))]
    out = tmp_path / "out.csv"
    cmd = [
        sys.executable,
        "-m",
        "medtl.cli",
        "predict",
        str(tiny_run),
        *files,
        "--csv",
        str(out),
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    # a killed process cannot remove its reader's private folders: they go to a scratch TMPDIR of this test
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and len(out.read_bytes().splitlines()) >= 4:  # the header and 3 rows
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    first = len(list(csv.DictReader(out.open())))
    assert 3 <= first <= len(files)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode in (0, 3), done.stderr
    assert f"{first} already in the file" in done.stdout or first == len(files)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(files) and len({r["input"] for r in rows}) == len(files)


@pytest.mark.slow
def test_torchrun_shards_the_inputs_and_merges_one_row_each(tiny_run, sample_dir, tmp_path):
    """Two processes under torchrun (gloo, CPU): each takes half the inputs, and the merged CSV equals a
    one-process run's, row for row."""
    files = [str(f) for f in sorted((sample_dir / "dicom").glob("*.dcm"))[:8]]
    base = ["predict", str(tiny_run), *files, "--batch-size", "4", "--device", "auto"]
    one = subprocess.run(
        [sys.executable, "-m", "medtl.cli", *base, "--csv", str(tmp_path / "one.csv")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode in (0, 3), one.stderr
    sharded = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "medtl.cli",
            *base,
            "--csv",
            str(tmp_path / "two.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert sharded.returncode in (0, 3), sharded.stderr[-3000:]
    assert "process 1 of 2" in sharded.stdout and "process 2 of 2" in sharded.stdout
    assert not list(tmp_path.glob("two.csv.part*"))
    rows = lambda p: sorted(csv.DictReader(open(p)), key=lambda r: r["input"])  # noqa: E731
    a, b = rows(tmp_path / "one.csv"), rows(tmp_path / "two.csv")
    assert [r["input"] for r in a] == [r["input"] for r in b] and len(b) == len(files)
    for x, y in zip(a, b):
        assert x["status"] == y["status"] and x["label"] == y["label"]
        for c in x:
            if c.startswith("p_") and x[c]:
                assert abs(float(x[c]) - float(y[c])) < 1e-4


def test_a_shard_does_not_shift_when_another_process_has_written_rows_already(tmp_path):
    """The race behind a flaky torchrun test: rank 0 wrote its first row before rank 1 listed what was left, so rank
    1 sharded a shorter list and two inputs went to no process. Each rank's shard is now of all the inputs."""
    from types import SimpleNamespace

    from medtl.predict.batch import _todo

    inputs = [SimpleNamespace(key=f"k{i}") for i in range(8)]
    final = tmp_path / "out.csv"
    before = [i.key for i in _todo(inputs, final, 1, 2)[0]]
    (tmp_path / "out.csv.part0").write_text("input,status\nk0,answered\n")  # rank 0 is ahead
    after, part = _todo(inputs, final, 1, 2)
    assert [i.key for i in after] == before == ["k1", "k3", "k5", "k7"] and part.name == "out.csv.part1"
    assert [i.key for i in _todo(inputs, final, 0, 2)[0]] == ["k2", "k4", "k6"]  # k0 done: resumed, not redone
