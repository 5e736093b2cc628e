"""Exported model packages: a trained run as ONNX or TorchScript, with everything needed to use it.

``export_run(RUN, OUT, "onnx")`` writes a folder that is itself a run :class:`medtl.predict.Predictor`
can load: ``config.yaml`` (how files are read and fed), ``model.safetensors`` (the weights, classes,
preprocessing record, temperature and operating point), ``ood.safetensors`` (the out-of-distribution
statistics), ``model.onnx`` or ``model.torchscript.pt`` (the network: an image batch in, logits and
pooled features out), ``export.json`` (format, input and outputs, the parity measured at export),
``MODEL_CARD.md`` and ``SHA256SUMS`` (every other file's sha256, checked when the package is loaded).

ONNX is written by ``torch.onnx.export(..., dynamo=True)`` (the graph captured by ``torch.export``); where that
fails (or onnxscript is not installed) by the legacy TorchScript-based exporter, with a logged warning saying
so. TorchScript packages are deprecated, as ``torch.jit`` is in torch: a fallback for networks ONNX cannot hold.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from medtl.errors import RunError, look_up_option
from medtl.predict.network import FORMATS, LogitsAndFeatures, load_network, max_probability_difference
from medtl.run import RunDir, SavedRun, load_saved_run
from medtl.version import __version__

PARITY_LIMIT = 1e-4  # the largest difference of probabilities from PyTorch an export may have
OPSET = 18  # the ONNX opset written: the lowest torch.export's exporter writes (ONNX Runtime runs it since 1.14)
EXPORTERS = {"dynamo": "torch.onnx.export(dynamo=True)", "legacy": "torch.onnx.export(dynamo=False)"}
TORCHSCRIPT_DEPRECATED = (
    "TorchScript is deprecated in torch (torch.jit.trace); the package is written for networks ONNX cannot hold, "
    "but ONNX (--format onnx) is the supported format"
)

EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")  # their info lines: one per graph rewrite (hundreds)

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "onnx", force: bool = False) -> Path:
    """Write the export package of ``run_dir`` to ``out`` (refused when ``out`` holds files, unless
    ``force``). The exported network's probabilities are compared with PyTorch's on generated inputs;
    a difference over :data:`PARITY_LIMIT` is an error."""
    look_up_option(fmt, FORMATS, "export format")
    source = RunDir.open(run_dir)
    saved = load_saved_run(source.path)
    package = RunDir.create(out, force)
    out = package.path
    model = saved.model.cpu().float().eval()
    pre = saved.preprocessing
    gen = torch.Generator().manual_seed(0)
    example = torch.randn((2, pre.in_chans, *(pre.input_size,) * pre.spatial_dims), generator=gen)
    wrapper = LogitsAndFeatures(model).eval()
    target = out / FORMATS[fmt]
    try:
        exporter = _write_network(wrapper, example, target, fmt)
    except Exception as e:  # (the exporters fail in many ways: unsupported operators, tracing, files)
        shutil.rmtree(out)
        raise RunError(
            f"{source.path}: its network cannot be written as {fmt} ({_first_line(e)}); nothing was written"
        ) from e
    for name in (RunDir.CONFIG, RunDir.MODEL, RunDir.OOD):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    check = torch.randn(example.shape, generator=gen) * 2
    parity = max_probability_difference(load_network(out, fmt), wrapper, check)
    if parity > PARITY_LIMIT:
        shutil.rmtree(out)
        raise RunError(
            f"{source.path}: the {fmt} export differs from PyTorch by {parity:.2g} in probability "
            f"(limit {PARITY_LIMIT:g}); nothing was written"
        )
    record = _export_record(fmt, saved, source.name, parity, exporter)
    package.write_json(RunDir.EXPORT, record)
    card = source.evaluation / RunDir.EVALUATION_CARD
    (package / RunDir.CARD).write_text(card.read_text() if card.is_file() else _short_card(source, record))
    package.write_checksums(p.name for p in out.iterdir() if p.is_file())
    return out


def _write_network(wrapper: LogitsAndFeatures, example: torch.Tensor, target: Path, fmt: str) -> str:
    """Write ``wrapper`` to ``target`` as ``fmt`` with a free batch size, and return how it was written: ONNX by
    ``torch.export`` (or, where that fails, the legacy exporter), or TorchScript traced on ``example``."""
    if fmt == "torchscript":
        log.warning(TORCHSCRIPT_DEPRECATED)
        with torch.no_grad():
            torch.jit.trace(wrapper, (example,)).save(str(target))
        return "torch.jit.trace"
    try:
        _write_onnx(wrapper, example, target, dynamo=True)
        return EXPORTERS["dynamo"]
    except Exception as e:  # (torch.export fails in many ways: operators, control flow, a missing onnxscript)
        reason = "onnxscript is not installed (pip install 'medtl[export]')" if isinstance(e, ImportError) else None
        log.warning(
            "torch.export could not write this network as ONNX (%s); falling back to the deprecated "
            "TorchScript-based ONNX exporter (its parity with PyTorch is checked all the same)",
            reason or _first_line(e),
        )
    target.unlink(missing_ok=True)
    _write_onnx(wrapper, example, target, dynamo=False)
    return EXPORTERS["legacy"]


def _write_onnx(wrapper: LogitsAndFeatures, example: torch.Tensor, target: Path, dynamo: bool) -> None:
    """One ONNX file (weights inside it), input ``image`` and outputs ``logits`` and ``features``, batch free."""
    batch = {"x": {0: torch.export.Dim("batch")}}  # torch.export: keyed by LogitsAndFeatures.forward's argument
    batch_axes = {"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}}  # the legacy exporter
    with torch.no_grad(), _quiet_exporters():
        torch.onnx.export(
            wrapper,
            (example,),
            str(target),
            input_names=["image"],
            output_names=["logits", "features"],
            opset_version=OPSET,
            dynamo=dynamo,
            external_data=False,
            dynamic_shapes=batch if dynamo else None,
            dynamic_axes=None if dynamo else batch_axes,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """While the block runs, the ONNX exporters' loggers show warnings only, unless debug lines are shown
    (``medtl -v``); their levels are put back afterwards."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _export_record(fmt: str, saved: SavedRun, source_run: str, parity: float, exporter: str) -> dict:
    """``export.json``'s content: the format, file and the ``exporter`` that wrote it, the input and outputs,
    what the model answers by, the versions, the parity measured at export and the run it came from
    (``source_run``)."""
    pre = saved.preprocessing
    return {
        "format": fmt,
        "file": FORMATS[fmt],
        "opset": OPSET if fmt == "onnx" else None,
        "exporter": exporter,
        "input": {
            "name": "image",
            "shape": ["batch", pre.in_chans, *(pre.input_size,) * pre.spatial_dims],
            "dtype": "float32",
            "preprocessing": asdict(pre),
            "note": "files are read and prepared as config.yaml says (medtl.predict.Predictor)",
        },
        "outputs": {
            "logits": "class logits (divide by the temperature, then softmax)",
            "features": "pooled encoder features (the out-of-distribution detector's input)",
        },
        "encoder": saved.encoder,
        "class_names": saved.class_names,
        "temperature": saved.temperature,
        "operating_point": saved.operating_point,
        "medtl": __version__,
        "torch": torch.__version__,
        "parity_max_probability_difference": parity,
        "source_run": source_run,
    }


def _short_card(run: RunDir, record: dict) -> str:
    """A model card from the run's own ``metrics.json`` (``medtl evaluate`` writes the full one)."""
    test = run.read_json(RunDir.METRICS, {}).get("test", {})
    lines = [
        f"# Model card: {run.name}",
        "",
        "Research on transfer learning for medical image classification. Not a medical device.",
        "",
        f"- Encoder: {record['encoder']}; classes: {', '.join(record['class_names'])}",
        f"- Test AUC {test.get('auc')}, accuracy {test.get('accuracy')} on {test.get('n_images')} images of "
        f"{test.get('n_patients')} patients (the run's own split; `medtl evaluate` adds confidence intervals)",
        f"- Temperature {record['temperature']}; operating point {record['operating_point']}",
        f"- Exported as {record['format']} by medtl {record['medtl']} (torch {record['torch']})",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["export_run", "PARITY_LIMIT", "OPSET", "EXPORTERS", "TORCHSCRIPT_DEPRECATED"]
