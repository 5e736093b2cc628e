"""medtl export: ONNX (written through torch.export, the legacy exporter only as a logged fallback) and
TorchScript (deprecated) packages that give PyTorch's probabilities (within 1e-4) on real and generated files,
are checked against their sha256 on load, and carry what a user needs."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from medtl.cli import main
from medtl.errors import RunError
from medtl.export import EXPORTERS, OPSET, PARITY_LIMIT, export_run
from medtl.predict.network import FORMATS, load_network
from medtl.predict.predictor import load_run
from medtl.run import verify_package


@pytest.fixture(scope="module")
def onnx_package(tiny_run, tmp_path_factory):
    return export_run(tiny_run, tmp_path_factory.mktemp("export") / "pkg", "onnx")


def _compare(reference, exported, files):
    worst = 0.0
    for f in files:
        a, b = reference.predict(f, check=False), exported.predict(f, check=False)
        assert a.label == b.label and a.refused is None and b.refused is None
        worst = max(worst, max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities))
    return worst


def test_onnx_package_holds_everything_and_matches_pytorch(tiny_run, onnx_package, sample_dir):
    names = {p.name for p in onnx_package.iterdir()}
    assert names == {
        "config.yaml",
        "model.safetensors",
        "ood.safetensors",
        "model.onnx",
        "export.json",
        "MODEL_CARD.md",
        "SHA256SUMS",
    }
    record = verify_package(onnx_package)
    assert record["format"] == "onnx" and record["parity_max_probability_difference"] <= PARITY_LIMIT
    assert record["exporter"] == EXPORTERS["dynamo"] and record["opset"] == OPSET  # torch.export, no fallback
    assert record["class_names"] == ["no lesion", "lesion"] and record["input"]["shape"][1:] == [3, 64, 64]
    files = sorted((sample_dir / "dicom").glob("*.dcm"))[:6] + sorted((sample_dir / "nifti").glob("*.nii.gz"))[:2]
    onnx = load_run(onnx_package, device="cpu", backend="onnx")
    assert _compare(load_run(tiny_run, device="cpu"), onnx, files) <= PARITY_LIMIT
    # the refusal path runs on the exported network's features too
    assert onnx.predict(files[0]).refused is None


@pytest.mark.shared_data
def test_onnx_parity_on_real_ct_files(tiny_run, onnx_package, shared_data):
    files = sorted((shared_data / "dicom" / "ct").rglob("*.dcm"))[:8]
    assert files, "no real CT DICOM files"
    worst = _compare(load_run(tiny_run, device="cpu"), load_run(onnx_package, device="cpu", backend="onnx"), files)
    assert worst <= PARITY_LIMIT


def _failing_dynamo(monkeypatch, error):
    """torch.onnx.export whose torch.export path raises ``error`` (the legacy path runs for real)."""
    real = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise error
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize(
    "error, said",
    [
        (RuntimeError("Failed to export the model with torch.export.\nmore detail"), "RuntimeError: Failed to export"),
        (ModuleNotFoundError("No module named 'onnxscript'"), "pip install 'medtl[export]'"),
    ],
)
def test_onnx_falls_back_to_the_legacy_exporter_and_says_so(tiny_run, tmp_path, monkeypatch, caplog, error, said):
    _failing_dynamo(monkeypatch, error)
    with caplog.at_level(logging.WARNING, logger="medtl.export"):
        pkg = export_run(tiny_run, tmp_path / "pkg", "onnx")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "falling back to the deprecated TorchScript-based ONNX exporter" in warning and said in warning
    record = verify_package(pkg)
    assert record["exporter"] == EXPORTERS["legacy"] and record["parity_max_probability_difference"] <= PARITY_LIMIT
    x = torch.randn(3, 3, 64, 64)  # a batch size the export never saw
    with torch.no_grad():
        z = load_run(tiny_run, device="cpu").model(x)
    np.testing.assert_allclose(load_network(pkg)(x)[0].softmax(1).numpy(), z.softmax(1).numpy(), atol=PARITY_LIMIT)


def test_a_network_no_exporter_can_write_is_refused_and_nothing_is_left(tiny_run, tmp_path, monkeypatch):
    def export(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::mystery")

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(RunError, match=r"cannot be written as onnx \(RuntimeError: unsupported operator"):
        export_run(tiny_run, tmp_path / "pkg", "onnx")
    assert not (tmp_path / "pkg").exists()


def test_torchscript_package_gives_the_same_outputs(tiny_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medtl.export"):
        pkg = export_run(tiny_run, tmp_path / "ts", "torchscript")
    assert "TorchScript is deprecated" in caplog.text
    record = verify_package(pkg)
    assert (pkg / FORMATS["torchscript"]).is_file() and record["format"] == "torchscript"
    assert record["exporter"] == "torch.jit.trace"
    x = torch.randn(3, 3, 64, 64)
    reference = load_run(tiny_run, device="cpu").model
    with torch.no_grad():
        z = reference(x)
    zt, f = load_network(pkg)(x)
    assert f.shape == (3, reference.num_features)
    np.testing.assert_allclose(zt.softmax(1).numpy(), z.softmax(1).numpy(), atol=PARITY_LIMIT)


def test_a_changed_or_unlisted_file_is_refused(tiny_run, onnx_package, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(onnx_package, pkg)
    (pkg / "config.yaml").write_text((pkg / "config.yaml").read_text() + "\n# edited\n")
    with pytest.raises(RunError, match="config.yaml does not match its sha256"):
        load_run(pkg, device="cpu", backend="onnx")
    shutil.copyfile(onnx_package / "config.yaml", pkg / "config.yaml")
    (pkg / "extra.bin").write_bytes(b"x")
    with pytest.raises(RunError, match="extra.bin is not listed"):
        verify_package(pkg)
    with pytest.raises(RunError, match="not a medtl export package"):
        load_run(tiny_run, device="cpu", backend="onnx")  # a run, not a package


def test_cli_export_help_states_torchscript_is_deprecated(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "torchscript (deprecated" in " ".join(capsys.readouterr().out.split())


def test_cli_export_and_predict_with_onnx(tiny_run, tmp_path, sample_dir, capsys, caplog):
    out = tmp_path / "pkg"
    caplog.set_level(logging.INFO)  # as `medtl` shows them
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    assert "probabilities within" in capsys.readouterr().out
    # the exporters' hundreds of info lines (one per graph rewrite) stay out of the terminal
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir", "torch.onnx"))]
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2  # a package is not overwritten by accident
    assert "already holds" in capsys.readouterr().err
    image = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    code = main(["predict", str(out), str(image), "--backend", "onnx", "--json", "--device", "cpu"])
    assert code in (0, 3)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["file"] == image.name
    assert main(["predict", str(out), str(image), "--backend", "torchscript", "--device", "cpu"]) == 2
    assert "holds a onnx network" in capsys.readouterr().err
