"""Exported model packages: a trained run as ONNX or TorchScript, with everything needed to use it.

``export_run(RUN, OUT, "onnx")`` writes a folder that is itself a run :class:`medtl.inference.Predictor`
can load: ``config.yaml`` (how files are read and fed), ``model.safetensors`` (the weights, classes,
preprocessing record, temperature and operating point), ``ood.safetensors`` (the out-of-distribution
statistics), ``model.onnx`` or ``model.torchscript.pt`` (the network: an image batch in, logits and
pooled features out), ``export.json`` (format, input and outputs, the parity measured at export),
``MODEL_CARD.md`` and ``SHA256SUMS`` (every other file's sha256, checked when the package is loaded).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtl import __version__
from medtl.checkpoint import load_saved_run
from medtl.errors import RunError, look_up_option
from medtl.models.encoders import file_sha256
from medtl.ood import OOD_FILE
from medtl.train.experiment import prepare_run_dir

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
EXPORT_FILE, SUMS_FILE, CARD_FILE = "export.json", "SHA256SUMS", "MODEL_CARD.md"
PARITY_LIMIT = 1e-4  # the largest difference of probabilities from PyTorch an export may have
OPSET = 17


class LogitsAndFeatures(nn.Module):
    """The network as exported: an (N, C, H, W) batch in; (logits, pooled encoder features) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(x)
        return self.model.forward_head(fmap), self.model.forward_head(fmap, pre_logits=True)


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "onnx", force: bool = False) -> Path:
    """Write the export package of ``run_dir`` to ``out`` (refused when ``out`` holds files, unless
    ``force``). The exported network's probabilities are compared with PyTorch's on generated inputs;
    a difference over :data:`PARITY_LIMIT` is an error."""
    look_up_option(fmt, FORMATS, "export format")
    run_dir = Path(run_dir)
    saved = load_saved_run(run_dir)
    out = prepare_run_dir(out, force)
    model = saved.model.cpu().float().eval()
    pre = saved.preprocessing
    gen = torch.Generator().manual_seed(0)
    example = torch.randn((2, pre.in_chans, *(pre.input_size,) * pre.spatial_dims), generator=gen)
    wrapper = LogitsAndFeatures(model).eval()
    target = out / FORMATS[fmt]
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(wrapper, (example,), str(target), dynamo=False, input_names=["image"],
                              output_names=["logits", "features"], opset_version=OPSET,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
        else:
            torch.jit.trace(wrapper, (example,)).save(str(target))
    for name in ("config.yaml", "model.safetensors", OOD_FILE):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    check = torch.randn(example.shape, generator=gen) * 2
    parity = max_probability_difference(load_network(out, fmt), wrapper, check)
    if parity > PARITY_LIMIT:
        shutil.rmtree(out)
        raise RunError(f"{run_dir}: the {fmt} export differs from PyTorch by {parity:.2g} in probability "
                       f"(limit {PARITY_LIMIT:g}); nothing was written")
    record = {"format": fmt, "file": FORMATS[fmt], "opset": OPSET if fmt == "onnx" else None,
              "input": {"name": "image", "shape": ["batch", pre.in_chans, *(pre.input_size,) * pre.spatial_dims],
                        "dtype": "float32", "preprocessing": asdict(pre),
                        "note": "files are read and prepared as config.yaml says (medtl.inference.Predictor)"},
              "outputs": {"logits": "class logits (divide by the temperature, then softmax)",
                          "features": "pooled encoder features (the out-of-distribution detector's input)"},
              "encoder": saved.encoder, "class_names": saved.class_names, "temperature": saved.temperature,
              "operating_point": saved.operating_point, "medtl": __version__, "torch": torch.__version__,
              "parity_max_probability_difference": parity, "source_run": run_dir.name}
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=2))
    card = run_dir / "evaluation" / "model_card.md"
    (out / CARD_FILE).write_text(card.read_text() if card.is_file() else _short_card(run_dir, record))
    write_sums(out)
    return out


def _short_card(run_dir: Path, record: dict) -> str:
    """A model card from the run's own ``metrics.json`` (``medtl evaluate`` writes the full one)."""
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    test = metrics.get("test", {})
    lines = [f"# Model card: {run_dir.name}", "",
             "Research on transfer learning for medical image classification. Not a medical device.", "",
             f"- Encoder: {record['encoder']}; classes: {', '.join(record['class_names'])}",
             f"- Test AUC {test.get('auc')}, accuracy {test.get('accuracy')} on {test.get('n_images')} images of "
             f"{test.get('n_patients')} patients (the run's own split; `medtl evaluate` adds confidence intervals)",
             f"- Temperature {record['temperature']}; operating point {record['operating_point']}",
             f"- Exported as {record['format']} by medtl {record['medtl']} (torch {record['torch']})"]
    return "\n".join(lines) + "\n"


def write_sums(folder: Path) -> None:
    """``SHA256SUMS`` (the ``sha256sum`` format) of every other file in ``folder``."""
    lines = [f"{file_sha256(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.is_file() and p.name != SUMS_FILE]
    (folder / SUMS_FILE).write_text("\n".join(lines) + "\n")


def verify_package(folder: str | Path) -> dict:
    """``export.json`` of a package whose files all match ``SHA256SUMS``; RunError naming the first that
    does not (changed, missing, or not listed)."""
    folder = Path(folder)
    sums, record = folder / SUMS_FILE, folder / EXPORT_FILE
    if not sums.is_file() or not record.is_file():
        raise RunError(f"{folder}: not a medtl export package (no {SUMS_FILE} or {EXPORT_FILE}); "
                       "write one with `medtl export RUN --out DIR`")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE}
    for name in sorted(present | set(listed)):
        if name not in listed:
            raise RunError(f"{folder}: {name} is not listed in {SUMS_FILE}")
        if name not in present:
            raise RunError(f"{folder}: {name} is listed in {SUMS_FILE} but missing")
        if file_sha256(folder / name) != listed[name]:
            raise RunError(f"{folder}: {name} does not match its sha256 in {SUMS_FILE} (changed after export)")
    return json.loads(record.read_text())


class ExportedNetwork:
    """An exported network run by ONNX Runtime (on a GPU where asked and available) or TorchScript: an image
    batch in, (logits, features) out as CPU float32 tensors."""

    def __init__(self, path: Path, fmt: str, device: torch.device = torch.device("cpu")):
        self.format, self.device = fmt, device
        if fmt == "onnx":
            import onnxruntime as ort  # imported on use: only exported packages need it

            providers = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(path), providers=providers)
        else:
            self.module = torch.jit.load(str(path), map_location=device).eval()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float().contiguous()
        if self.format == "onnx":
            z, f = self.session.run(None, {"image": x.cpu().numpy()})
            return torch.from_numpy(z), torch.from_numpy(f)
        with torch.no_grad():
            z, f = self.module(x.to(self.device))
        return z.float().cpu(), f.float().cpu()


def load_network(folder: str | Path, fmt: str | None = None, device: torch.device = torch.device("cpu")) -> ExportedNetwork:
    """The exported network of a package folder (its format from ``export.json`` unless given)."""
    folder = Path(folder)
    fmt = fmt or json.loads((folder / EXPORT_FILE).read_text())["format"]
    return ExportedNetwork(folder / FORMATS[fmt], fmt, device)


def max_probability_difference(network: ExportedNetwork, reference: nn.Module, x: torch.Tensor) -> float:
    """The largest absolute difference between the softmax of ``network``'s and ``reference``'s logits on ``x``."""
    with torch.no_grad():
        expected = reference(x)[0].softmax(dim=1)
    got = network(x)[0].softmax(dim=1)
    return float(np.abs((got - expected).numpy()).max())


__all__ = ["export_run", "verify_package", "load_network", "ExportedNetwork", "LogitsAndFeatures",
           "max_probability_difference", "FORMATS", "PARITY_LIMIT"]
