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
    args = ["train", "--manifest", str(data / "manifest.csv"), "--out", str(run), "--input-size", "64",
            "--epochs", "1", "--frozen-epochs", "1", "--batch-size", "8"]
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
    assert main(["train", "--manifest", str(data / "manifest.csv"), "--out", str(run), "--input-size", "64",
                 "--epochs", "1", "--frozen-epochs", "0", "--batch-size", "8"]) == 0
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
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def test_train_on_a_medmnist_npz_uses_its_split(tmp_path):
    from tests.data.test_sources import write_medmnist

    npz = write_medmnist(tmp_path / "mm.npz", n=(24, 8, 10))
    run = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--out", str(run), "--input-size", "32", "--epochs", "1",
                 "--frozen-epochs", "1", "--strategy", "partial"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"].startswith("fixed") and metrics["test"]["n_images"] == 10
    assert metrics["strategy"] == "partial"


def test_volumes_read_slice_by_slice_give_a_study_score_and_a_slice_profile(tmp_path, sample_dir):
    from medtl.inference import load_run
    from tests.conftest import tiny_config

    cfg = tiny_config(sample_dir / "manifest.csv")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, volume_mode="slices_2.5d"))
    from medtl.train import run_experiment

    run = run_experiment(cfg, tmp_path / "run")
    predictor = load_run(run)
    volume = sorted((sample_dir / "nifti").glob("*.nii.gz"))[0]
    pred = predictor.predict(volume)
    assert len(pred.slice_scores) == 12 and 0 <= pred.slice_index < 12
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    expl = predictor.explain(volume)
    assert expl.saliency.shape == expl.image.shape and expl.prediction.slice_index is not None
