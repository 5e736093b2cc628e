import dataclasses
import json
import shutil

import pytest

from medtl.cli import main


def test_sample_train_predict_explain_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["sample-data", str(data), "--patients", "12", "--seed", "2"]) == 0
    assert (data / "manifest.csv").is_file()
    assert main(["sample-data", str(data)]) == 2  # refuses to overwrite
    run = tmp_path / "runs" / "r1"
    args = [
        "train",
        "--manifest",
        str(data / "manifest.csv"),
        "--out",
        str(run),
        "--input-size",
        "64",
        "--epochs",
        "1",
        "--frozen-epochs",
        "1",
        "--batch-size",
        "8",
    ]
    assert main(args) == 0
    assert "test AUC" in capsys.readouterr().out
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 2  # nothing in runs/ is overwritten without --force
    assert "--force" in capsys.readouterr().err
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp

    bad = tmp_path / "bad.dcm"
    bad.write_text("not dicom")
    img = data / "dicom" / "img_0001.dcm"
    assert main(["predict", str(run), str(bad), str(img), "--json"]) == 1  # bad file reported, others done
    captured = capsys.readouterr()
    assert "bad.dcm" in captured.err and "not a DICOM" in captured.err
    pred = json.loads(captured.out.strip())
    assert pred["file"] == "img_0001.dcm" and abs(sum(pred["probabilities"].values()) - 1) < 1e-5

    out = tmp_path / "expl.png"
    assert main(["explain", str(run), str(img), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["explain", str(run), str(img), "--out", str(out)]) == 1  # exists: not replaced


def test_train_reports_bad_manifest_rows_and_uses_the_rest(tmp_path, sample_dir, caplog):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    (data / "dicom" / "img_0003.dcm").write_text("garbage")  # corrupt one file
    with open(data / "manifest.csv", "a") as f:
        f.write("dicom/absent.dcm,1,PX,CT\n")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--manifest",
                str(data / "manifest.csv"),
                "--out",
                str(run),
                "--input-size",
                "64",
                "--epochs",
                "1",
                "--frozen-epochs",
                "0",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    skipped = (run / "skipped.csv").read_text()
    assert "img_0003.dcm" in skipped and "absent.dcm" in skipped
    assert "img_0003.dcm" in caplog.text


def test_info_prints_summary_and_fails_on_bad_file(tmp_path, sample_dir, capsys):
    assert main(["info", str(sample_dir / "dicom" / "img_0001.dcm")]) == 0
    out = capsys.readouterr().out
    assert '"modality": "CT"' in out and '"units": "HU"' in out and "SYN" not in out
    (tmp_path / "x.dcm").write_bytes(b"\0" * 10)
    assert main(["info", str(tmp_path / "x.dcm")]) == 1


@pytest.mark.parametrize("argv", [["train", "--out", "x", "--encoder", "resnet"], ["encoders"]])
def test_encoder_names(argv, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    code = main(argv)
    text = capsys.readouterr()
    if argv[0] == "encoders":
        assert code == 0 and "efficientnet_lite0" in text.out
    else:
        assert code == 2 and "did you mean" in text.err


def test_ui_is_installed_with_the_package(tmp_path):
    """`medtl serve` imports the ui package; it must work outside the source tree too."""
    import subprocess
    import sys

    code = "import medtl_ui.app, medtl.cli; print(medtl_ui.app.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-500:]


def test_train_on_a_medmnist_npz_uses_its_split(tmp_path):
    from tests.data.test_sources import write_medmnist

    npz = write_medmnist(tmp_path / "mm.npz", n=(24, 8, 10))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(npz),
                "--out",
                str(run),
                "--input-size",
                "32",
                "--epochs",
                "1",
                "--frozen-epochs",
                "1",
                "--strategy",
                "partial",
            ]
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"].startswith("fixed") and metrics["test"]["n_images"] == 10
    assert metrics["strategy"] == "partial"


def test_volumes_read_slice_by_slice_give_a_study_score_and_a_slice_profile(tmp_path, sample_dir):
    from medtl.predict.predictor import load_run
    from tests.conftest import tiny_config

    cfg = tiny_config(sample_dir / "manifest.csv")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, volume_mode="slices_2.5d"))
    from medtl.train import run_experiment

    run = run_experiment(cfg, tmp_path / "run")
    predictor = load_run(run)
    volume = min((sample_dir / "nifti").glob("*.nii.gz"))
    pred = predictor.predict(volume)
    assert len(pred.slice_scores) == 12 and 0 <= pred.slice_index < 12
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    expl = predictor.explain(volume)
    assert expl.saliency.shape == expl.image.shape and expl.prediction.slice_index is not None


def _option(parser, *names):
    """The argparse action of ``names`` (a sub-command path, then the flag)."""
    for name in names[:-1]:
        [sub] = [a for a in parser._actions if a.dest in ("command", "pacs_command")]
        parser = sub.choices[name]
    [action] = [a for a in parser._actions if names[-1] in a.option_strings]
    return action


def test_train_flags_are_made_from_the_config_fields():
    """A flag that sets one field takes its type, its options and its comment from the field; its default is
    None ("as the configuration says"), and what is given becomes load_config's overrides."""
    import argparse

    from medtl.cli import build_parser
    from medtl.cli.config_flags import config_overrides, field_comments
    from medtl.cli.train import CONFIG_FLAGS
    from medtl.config import DataConfig, TrainConfig
    from medtl.options import PRECISIONS, STRATEGIES, VOLUME_MODES

    parser = build_parser()
    for command in ("train", "lr-find"):
        epochs, strategy = _option(parser, command, "--epochs"), _option(parser, command, "--strategy")
        assert epochs.type is int and epochs.default is None
        assert epochs.help.startswith(field_comments(TrainConfig)["epochs"]) and "train.epochs" in epochs.help
        assert tuple(strategy.choices) == STRATEGIES and strategy.default is None
        assert "auto_candidates" in strategy.help  # the comment's continuation lines too
    assert tuple(_option(parser, "train", "--precision").choices) == PRECISIONS
    assert tuple(_option(parser, "train", "--volume-mode").choices) == VOLUME_MODES
    assert field_comments(DataConfig)["volume_mode"].endswith(
        "or \"3d\": the whole volume into a 3D encoder (resnet18_3d, ...)"
    )
    args = parser.parse_args(
        [
            "train",
            "--out",
            "r",
            "--data",
            "d/",
            "--epochs",
            "3",
            "--batch-size",
            "auto",
            "--label-columns",
            "a,b",
            "--input-size",
            "64",
        ]
    )
    assert config_overrides(args, CONFIG_FLAGS) == {
        "data": {"path": "d", "label_columns": ("a", "b")},
        "train": {"epochs": 3, "batch_size": "auto"},
        "encoder": {"input_size": 64},
    }
    assert _option(parser, "train", "--manifest").help == argparse.SUPPRESS  # the old name of --data still works
    assert config_overrides(parser.parse_args(["train", "--out", "r"]), CONFIG_FLAGS) == {}


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["train", "--strategy", "linear-probe"],
            "unknown train.strategy 'linear-probe'; did you mean 'linear_probe'?",
        ),
        (["train", "--precision", "fp64"], "unknown train.precision 'fp64'"),
        (["train", "--ct-window", "lungs"], "unknown CT window 'lungs'; did you mean 'lung'?"),
        (["export", "RUN", "--out", "pkg", "--format", "tflite"], "unknown export format 'tflite'"),
        (["adapt", "RUN", "--data", "x", "--out", "a", "--method", "tent2"], "unknown adaptation method 'tent2'"),
        (["predict", "RUN", "x.dcm", "--decision", "test"], "unknown decision 'test'"),
        (["explain", "RUN", "x.dcm", "--method", "gradcam2"], "unknown saliency method 'gradcam2'"),
    ],
)
def test_a_value_outside_a_flags_options_is_refused_in_the_librarys_words(argv, words, tmp_path, capsys):
    """Fixed option sets are argparse choices (listed by --help); a value outside them is one line and exit 2
    before anything is read, as the library says it."""
    argv = [str(tmp_path / a) if a in ("RUN", "pkg", "a") else a for a in argv]
    if argv[0] == "train":
        argv += ["--data", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and "expected one of" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written, nothing read


def test_the_commands_that_answer_with_a_run_take_decision(capsys):
    from medtl.cli import build_parser

    parser = build_parser()
    for path in (["predict"], ["explain"], ["dicom-results"], ["pacs", "run"], ["serve"]):
        action = _option(parser, *path, "--decision")
        assert tuple(action.choices) == ("training", "evaluation") and action.default == "training"
        assert "`medtl evaluate` chose" in action.help


def test_info_shows_no_identifier_from_a_zip_unless_asked(tmp_path, capsys, caplog):
    """A zip whose member paths name the patient and whose SeriesDescription holds a name: `medtl info` printed
    both (and the log the member path); now keys, and the description left out as `medtl deid` leaves it out."""
    import io
    import logging
    import zipfile

    import pydicom

    from medtl.data import create_sample_series

    series = create_sample_series(tmp_path / "s", n_slices=3, size=32)
    study = tmp_path / "study.zip"
    with zipfile.ZipFile(study, "w") as z:
        for i, p in enumerate(sorted(series.iterdir())):
            ds = pydicom.dcmread(p)
            ds.SeriesDescription = "Head for DOE JOHN"
            buf = io.BytesIO()
            ds.save_as(buf)
            z.writestr(f"DOE_JOHN_19700101/IM{i}", buf.getvalue())
        z.writestr("DOE_JOHN_19700101/notes.txt", b"hello")
    with caplog.at_level(logging.WARNING):
        assert main(["info", str(study)]) == 0
    out = capsys.readouterr().out
    assert "DOE" not in out and "JOHN" not in out and "19700101" not in out and '"file": "file-' in out
    assert "DOE" not in caplog.text and "JOHN" not in caplog.text  # (read in the bounded worker, whose log is kept in)
    assert main(["info", str(study), "--show-paths"]) == 0
    assert "DOE_JOHN_19700101/notes.txt" in capsys.readouterr().out  # asked for
