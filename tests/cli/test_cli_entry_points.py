"""The CLI entry points test_cli.py leaves out: lr-find, serve's sign-in check, predict's text output,
explain with several files and its options, info's series and volume choice, evaluate with the data
randomisation test, and train's --config, --no-pretrained, --weights-file and --cache-dir."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image

from medtl.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _class_names(run: Path) -> list[str]:
    return json.loads((run / "metrics.json").read_text())["class_names"]


def _train(manifest: Path, out: Path, *extra: str) -> int:
    return main(
        ["train", "--data", str(manifest), "--out", str(out), "--input-size", "64", "--batch-size", "8", *extra]
    )


# -- lr-find --------------------------------------------------------------------------------------


def test_lr_find_suggests_a_rate_and_plots_it(small_manifest, tmp_path, capsys):
    plot = tmp_path / "lr.png"
    assert (
        main(["lr-find", "--data", str(small_manifest), "--input-size", "64", "--batch-size", "8", "--plot", str(plot)])
        == 0
    )
    out = capsys.readouterr().out
    m = re.search(
        r"suggested head learning rate: (\S+) \(steepest loss descent over (\d+) steps from (\S+) to (\S+)\)", out
    )
    assert m, out
    lr, steps, lo, hi = float(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert 12 <= steps <= 100  # the sweep stops early only once the loss diverges (after 11 steps)
    assert lo < hi and lo * 0.5 <= lr <= hi * 1.5  # within the swept range (both ends printed rounded)
    assert f"plot written to {plot}" in out
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(plot) as im:
        assert im.format == "PNG" and min(im.size) > 100


# -- serve ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["nocolon", ":s3cret", "user:"])
@pytest.mark.parametrize("source", ["MEDTL_AUTH", "--auth-file"])
def test_serve_refuses_a_bad_auth_value_without_starting(auth, source, tmp_path, monkeypatch, capsys):
    from medtl_ui import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # (were anything started, the environment stays as it was)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    started = []
    monkeypatch.setattr(app, "launch", lambda *a, **k: started.append(a) or pytest.fail("page launched"))
    argv = ["serve", str(tmp_path)]
    if source == "MEDTL_AUTH":
        monkeypatch.setenv("MEDTL_AUTH", auth)
    else:
        monkeypatch.delenv("MEDTL_AUTH", raising=False)
        (tmp_path / "auth").write_text(auth + "\n")
        argv += ["--auth-file", str(tmp_path / "auth")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not hold USER:PASS" in err and (source == "--auth-file") == (str(tmp_path / "auth") in err)
    assert "Traceback" not in err and "s3cret" not in err  # one line, and the password is not echoed
    assert started == []


# -- predict --------------------------------------------------------------------------------------


def test_predict_prints_classes_and_reports_a_broken_file(tiny_run, sample_dir, tmp_path, capsys):
    classes = _class_names(tiny_run)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" + b"\0" * 200)
    good = [sample_dir / "dicom" / "img_0001.dcm", sample_dir / "nifti" / "vol_001.nii.gz"]
    assert main(["predict", str(tiny_run), str(good[0]), str(broken), str(good[1])]) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [p.name for p in good]  # the good ones, in order
    text = {}
    for line in lines:
        name, label, probs = line.split("\t")
        assert label in classes
        found = dict(kv.rsplit(": ", 1) for kv in probs.split("  "))  # class names may hold spaces
        assert list(found) == classes
        assert sum(map(float, found.values())) == pytest.approx(1.0, abs=2e-3)
        text[name] = {c: float(v) for c, v in found.items()}
    [error] = [line for line in captured.err.splitlines() if line.startswith("error:")]  # one, for the bad file
    assert "broken.dcm" in error and "img_0001" not in captured.err and "vol_001" not in captured.err

    assert main(["predict", str(tiny_run), *map(str, good), "--json"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [p["file"] for p in preds] == [p.name for p in good]
    for p in preds:
        assert list(p["probabilities"]) == classes
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0 <= v <= 1 for v in p["probabilities"].values())
        for c, v in p["probabilities"].items():  # the same numbers as the text output, to its 3 decimals
            assert text[p["file"]][c] == pytest.approx(v, abs=6e-4)


def test_predict_decision_evaluation_answers_by_the_evaluations_decision(tiny_run, sample_dir, tmp_path, capsys):
    """--decision evaluation: the decision `medtl evaluate` chose; a run not evaluated is refused, saying so."""
    from medtl.run import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    img = str(sample_dir / "dicom" / "img_0001.dcm")
    assert not (RunDir(run).evaluation / RunDir.DECISION).exists()
    assert main(["predict", str(run), img, "--decision", "evaluation", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has not been evaluated" in err and "`medtl evaluate`" in err
    assert "Traceback" not in err

    classes = _class_names(run)
    RunDir(run).write_decision(
        {
            "source": "evaluation",
            "temperature": 1.0,  # every image the second class
            "operating_point": {"rule": "by hand", "threshold": 0.0},
        }
    )
    assert main(["predict", str(run), img, "--decision", "evaluation", "--json", "--device", "cpu"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["decision_source"] == "evaluation" and pred["threshold"] == 0.0 and pred["label"] == classes[1]
    assert main(["predict", str(run), img, "--json", "--device", "cpu"]) == 0  # training's unless asked
    assert json.loads(capsys.readouterr().out)["decision_source"] == "training"


# -- explain --------------------------------------------------------------------------------------


def test_explain_occlusion_writes_one_overlay_per_input(tiny_run, sample_dir, tmp_path, capsys):
    from medtl.io import read_image

    inputs = [sample_dir / "dicom" / "img_0002.dcm", sample_dir / "nifti" / "vol_002.nii.gz"]
    target = _class_names(tiny_run)[1]
    out = tmp_path / "maps"
    assert (
        main(
            [
                "explain",
                str(tiny_run),
                *map(str, inputs),
                "--method",
                "occlusion",
                "--target",
                target,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    expected = ["img_0002_occlusion.png", "vol_002_occlusion.png"]
    assert sorted(p.name for p in out.iterdir()) == expected
    for path, name in zip(inputs, expected):
        assert f"-> {out / name}" in printed
        rows, cols = read_image(path).array.shape[-2:]  # a volume: its slices' size
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (cols, rows)  # drawn on the original image, not the 64 px model input


def test_explain_refuses_an_unknown_target_or_method(tiny_run, sample_dir, tmp_path, capsys):
    from medtl.errors import ConfigError
    from medtl.predict.predictor import load_run

    img = sample_dir / "dicom" / "img_0001.dcm"
    classes = _class_names(tiny_run)
    with pytest.raises(ConfigError) as e:
        load_run(tiny_run, device="cpu").explain(img, class_name="nodule")
    assert "nodule" in str(e.value) and all(repr(c) in str(e.value) for c in classes)

    out = tmp_path / "maps"
    assert main(["explain", str(tiny_run), str(img), "--target", "nodule", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "unknown class 'nodule'" in err and all(repr(c) in err for c in classes) and "Traceback" not in err

    assert main(["explain", str(tiny_run), str(img), "--method", "saliency9", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "unknown saliency method 'saliency9'" in err and "occlusion" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written for either


# -- info -----------------------------------------------------------------------------------------


def _info(capsys, *argv) -> tuple[int, dict]:
    code = main(["info", *map(str, argv)])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def two_series(sample_dir, tmp_path) -> tuple[Path, str, str]:
    """A study folder with a 3-slice CT series and a 2-slice MR series, made from one sample file."""
    src = pydicom.dcmread(sample_dir / "dicom" / "img_0001.dcm")
    study = tmp_path / "study"
    study.mkdir()
    ct_uid, mr_uid = "1.2.826.0.1.3680043.10.1511.901", "1.2.826.0.1.3680043.10.1511.902"
    for i, (uid, number, modality) in enumerate([(ct_uid, 1, "CT")] * 3 + [(mr_uid, 2, "MR")] * 2):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = uid, number, modality
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1511.91{i}"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.save_as(study / f"IM{i:03d}", enforce_file_format=True)
    return study, ct_uid, mr_uid


def test_info_shows_the_chosen_series_and_why(two_series, capsys):
    study, ct_uid, mr_uid = two_series
    code, auto = _info(capsys, study)
    assert code == 0 and auto["usable"]
    assert sorted(s["series_uid"] for s in auto["series"]) == [ct_uid, mr_uid]
    assert auto["chosen"]["series_uid"] == ct_uid and "most slices (3)" in auto["chosen"]["reason"]
    assert auto["image"]["shape"][0] == 3

    code, picked = _info(capsys, study, "--series", mr_uid)
    assert code == 0 and picked["usable"]
    assert picked["chosen"] == {"series_uid": mr_uid, "series_number": 2, "reason": "chosen by the user (series_uid)"}
    assert picked["image"]["shape"][0] == 2 and picked["image"]["modality"] == "MR"

    code, ct = _info(capsys, study, "--modality", "CT")
    assert code == 0 and ct["chosen"]["series_uid"] == ct_uid
    assert ct["chosen"]["reason"].startswith("modality CT") and "only candidate" in ct["chosen"]["reason"]
    code, mr = _info(capsys, study, "--modality", "mr")  # fewer slices, but the modality asked for
    assert code == 0 and mr["chosen"]["series_uid"] == mr_uid and mr["image"]["shape"][0] == 2

    code, wrong = _info(capsys, study, "--series", "1.2.3.999")
    assert code == 1 and wrong["usable"] is False and "chosen" not in wrong
    assert "1.2.3.999 not found" in wrong["error"] and ct_uid in wrong["error"] and mr_uid in wrong["error"]
    code, none = _info(capsys, study, "--modality", "XR")
    assert code == 1 and none["usable"] is False and "no XR series" in none["error"]


def test_info_volume_index_picks_a_volume_of_a_4d_nifti(tmp_path, capsys):
    data = np.stack([np.full((8, 9, 5), 100 * (k + 1), np.int16) for k in range(3)], axis=-1)
    data[0, 0, 0, :] = 0  # each volume: 0 and 100 * (k + 1)
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)

    code, report = _info(capsys, path, "--volume-index", "2")
    assert code == 0 and report["usable"]
    assert sorted(report["shape"]) == [5, 8, 9]  # one 3D volume
    assert report["value_range"] == [0.0, 300.0]  # the third volume's values
    assert "volume 2 of 3 used" in report["notes"]
    code, first = _info(capsys, path, "--volume-index", "0")
    assert code == 0 and first["value_range"] == [0.0, 100.0]

    code, refused = _info(capsys, path)
    assert code == 1 and refused["usable"] is False and "volume_index" in refused["error"]
    code, outside = _info(capsys, path, "--volume-index", "3")
    assert code == 1 and "out of range" in outside["error"]


# -- evaluate -------------------------------------------------------------------------------------


def test_evaluate_with_operating_point_and_data_randomisation(tiny_run, small_manifest, tmp_path, capsys, monkeypatch):
    import functools

    import medtl.eval.evaluate as report
    from medtl.predict.predictor import load_run

    # the sanity checks on one image instead of three (11 Grad-CAMs, not 33): the command is otherwise as typed
    monkeypatch.setattr(report, "evaluate_run", functools.partial(report.evaluate_run, sanity_images=1))
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # evaluate writes into the run: leave the session's run as it was
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--data",
                str(small_manifest),
                "--operating-point",
                "specificity:0.8",
                "--boot",
                "20",
                "--methods",
                "gradcam",
                "--data-randomisation",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "not checked: gradcampp, occlusion, integrated_gradients" in out
    assert "test AUC" in out and "gradcam" in out
    assert f"report: {run / 'evaluation' / 'report.html'}" in out
    folder = run / "evaluation"
    assert (folder / "report.html").stat().st_size > 1000
    result = json.loads((folder / "evaluation.json").read_text())
    op = result["operating_point"]
    assert op["rule"].startswith("specificity >= 0.8") and 0.0 <= op["threshold"] <= 1.0
    assert {"sensitivity", "specificity", "ppv", "npv", "sensitivity_ci"} <= set(op)
    assert result["data"] == "manifest.csv" and result["n_test_images"] == 4  # --data's own test split
    assert sum(map(sum, op["confusion_matrix"])) == result["n_test_images"]
    assert f"operating point ({op['rule']}): threshold {op['threshold']:.3f}" in out  # printed, not only written
    [sanity] = result["saliency_sanity"]
    assert sanity["method"] == "gradcam"
    assert isinstance(sanity["data_randomisation"], float) and -1.0 <= sanity["data_randomisation"] <= 1.0
    assert sanity["verdict"] and sanity["verdict"].split()[0] in out  # the verdict printed is the one written
    card = json.loads((folder / "model_card.json").read_text())
    assert card["metrics"]["operating_point"]["threshold"] == pytest.approx(op["threshold"])
    # the chosen threshold and temperature are saved beside the report, used when asked for
    predictor = load_run(run, device="cpu", decision="evaluation")
    assert predictor.decision.threshold == pytest.approx(op["threshold"])
    assert predictor.decision.temperature == pytest.approx(result["calibration"]["temperature"])
    assert load_run(run, device="cpu").decision.source == "training"  # unless asked, training's stays


# -- train options --------------------------------------------------------------------------------


def _cache_files(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def _history_rows(run: Path) -> list[str]:
    return (run / "history.csv").read_text().strip().splitlines()[1:]


def test_train_config_file_and_cache_dir(small_manifest, tmp_path):
    manifest = small_manifest
    n_rows = len(manifest.read_text().strip().splitlines()) - 1
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "train": {"strategy": "linear_probe", "epochs": 1, "frozen_epochs": 0, "seed": 3, "precision": "fp32"},
                "data": {"augment": False},
                "explain": {"n_overlays": 0},
            }
        )
    )
    cache = tmp_path / "cache"
    runs = [tmp_path / "a", tmp_path / "b"]
    assert _train(manifest, runs[0], "--config", str(config), "--cache-dir", str(cache)) == 0
    written = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert written["train"]["strategy"] == "linear_probe" and written["train"]["seed"] == 3
    assert written["train"]["epochs"] == 1 and written["train"]["frozen_epochs"] == 0
    assert written["encoder"]["input_size"] == 64  # the command line on top of the file
    assert written["data"]["cache_dir"] == str(cache)
    assert len(_history_rows(runs[0])) == 1  # the one epoch the file asks for
    files = _cache_files(cache)
    assert len(files) == n_rows  # one decoded input per manifest row

    assert _train(manifest, runs[1], "--config", str(config), "--cache-dir", str(cache)) == 0
    assert _cache_files(cache) == files  # the same files, none written again
    first, second = (json.loads((r / "metrics.json").read_text()) for r in runs)
    for split in ("val", "test"):
        assert second[split]["auc"] == first[split]["auc"]
        assert second[split]["confusion_matrix"] == first[split]["confusion_matrix"]
    (row_a,), (row_b,) = _history_rows(runs[0]), _history_rows(runs[1])
    a, b = row_a.split(","), row_b.split(",")
    assert a[:2] == b[:2] and [float(v) for v in b[2:5]] == pytest.approx([float(v) for v in a[2:5]], rel=1e-5)
    assert (runs[1] / "splits.csv").read_text() == (runs[0] / "splits.csv").read_text()


def test_cache_dir_is_not_shared_by_different_preprocessing(sample_dir, tmp_path):
    """Inputs decoded with one CT window are never read back for another: the cache folder is keyed by
    every setting that shapes a decoded input (it was keyed by the manifest row alone)."""
    from medtl.config import load_config
    from medtl.data import decode_records, read_dataset
    from medtl.models import Preprocessing
    from medtl.train.data import cache_folder
    from medtl.transforms.chain import create_transforms

    records = read_dataset(sample_dir / "manifest.csv").records[:2]
    decoded, folders = {}, {}
    pre = Preprocessing(input_size=64)
    for window, cache in [("lung", tmp_path / "cache"), ("bone", tmp_path / "cache"), ("bone", None)]:
        cfg = load_config(
            data={
                "path": str(sample_dir / "manifest.csv"),
                "ct_window": window,
                "cache_dir": str(cache) if cache else None,
            }
        )
        chain, _ = create_transforms(cfg.data, pre, train=False)
        folders[window, cache is None] = cache_folder(cfg.data, pre)
        samples, _ = decode_records(records, chain, folders[window, cache is None])
        decoded[window, cache is None] = np.asarray(samples[0]["image"])
    assert np.allclose(decoded["bone", False], decoded["bone", True])  # cached bone window == fresh bone window
    assert not np.allclose(decoded["lung", False], decoded["bone", False])
    assert folders["lung", False] != folders["bone", False] and folders["bone", True] is None


def test_train_no_pretrained_records_random_initialisation(small_manifest, tmp_path):
    run = tmp_path / "scratch"
    assert (
        _train(small_manifest, run, "--no-pretrained", "--epochs", "1", "--frozen-epochs", "1", "--precision", "fp32")
        == 0
    )
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["encoder"]["pretrained"] is False
    assert written["resolved"]["weights_source"] == "random initialisation"
    # from scratch: every layer trains at the head's rate and BatchNorm statistics are learnt
    assert written["train"]["strategy"] == "full" and written["resolved"]["strategy"] == "full"
    assert written["train"]["encoder_lr_mult"] == 1.0 and written["train"]["freeze_bn"] is False
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "full"
    assert [row.split(",")[1] for row in _history_rows(run)] == ["full"]  # no head-only warm-up stage


def test_train_weights_file_is_loaded_and_a_mismatch_is_a_weights_error(small_manifest, tmp_path, capsys):
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    from medtl.config import load_config
    from medtl.models import WeightsError, create_model

    torch.manual_seed(5)
    encoder = {
        k: v.contiguous()
        for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()
        if not k.startswith("classifier.")
    }  # an encoder-only file: the head is always new
    weights = tmp_path / "lite0_own.safetensors"
    save_file(encoder, str(weights))
    run = tmp_path / "own"
    assert (
        _train(
            small_manifest,
            run,
            "--weights-file",
            str(weights),
            "--strategy",
            "linear_probe",
            "--epochs",
            "1",
            "--precision",
            "fp32",
        )
        == 0
    )
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["encoder"]["weights_file"] == str(weights)
    assert written["resolved"]["weights_source"].startswith("lite0_own.safetensors (sha256 ")
    saved = load_file(str(run / "model.safetensors"))
    for key in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "conv_head.weight"):  # a linear probe keeps
        assert torch.equal(saved[key], encoder[key])  # the file's encoder

    wrong = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(wrong))
    cfg = load_config(encoder={"weights_file": str(wrong), "input_size": 64})
    with pytest.raises(WeightsError, match="does not fit"):
        create_model(cfg.encoder, 2)
    assert _train(small_manifest, tmp_path / "bad", "--weights-file", str(wrong), "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "resnet18.safetensors: does not fit" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "model.safetensors").exists()
