"""``medtl adapt``: a trained run adapted to a new site's unlabelled images, written as a new run.

``adapt_run(RUN, files, OUT, method)`` reads the target files as the run reads its inputs (a file
that cannot be read is reported and skipped), adapts a copy of the model (:mod:`medtl.adapt.batchnorm`:
source-matched AdaBN by default, or TENT) and writes ``OUT``: the run's files with the adapted
weights, and ``adaptation.json``, its provenance (the source run and the sha256 of its weights, the
method, how many target images, a hash of their keys, medtl's version, the date). The temperature,
the operating point and the out-of-distribution detector are the source run's: they were chosen
on the source's validation data, and no target labels exist to choose them again.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import shutil
from pathlib import Path

import torch

from medtl.adapt.batchnorm import adapt, load_bn_statistics
from medtl.errors import ConfigError, MedtlError, RunError, look_up_option
from medtl.models.checkpoint import save_model
from medtl.models.encoders import file_sha256
from medtl.options import ADAPT_METHODS
from medtl.predict.batch import input_key
from medtl.predict.predictor import Predictor
from medtl.run import RunDir
from medtl.version import __version__

log = logging.getLogger("medtl.adapt.site")
RUN_FILES = (RunDir.CONFIG, RunDir.OOD, RunDir.BN_SOURCE, RunDir.METRICS, RunDir.HISTORY, RunDir.CARD)  # copied


def target_inputs(predictor: Predictor, files: list[Path]) -> tuple[torch.Tensor, list[str], list[MedtlError]]:
    """The model inputs of ``files`` (every input of a volume's slices), their files' keys, and the errors
    of the files that could not be read."""
    inputs, keys, errors = [], [], []
    for f in files:
        try:
            x, _ = predictor.inputs(predictor.read(f))
        except MedtlError as e:
            log.warning("skipped: %s", e)
            errors.append(e)
            continue
        inputs.append(x.float())
        keys.append(input_key(f))
    if not inputs:
        raise ConfigError(None, "no target image could be read", "image files of the new site")
    return torch.cat(inputs), keys, errors


def adapt_run(
    run_dir: str | Path,
    files: list[str | Path],
    out: str | Path,
    method: str = "adabn",
    force: bool = False,
    device: str = "auto",
    epochs: int = 1,
    seed: int = 0,
) -> dict:
    """Adapt the run to the unlabelled ``files``; write the new run to ``out``; return its provenance."""
    look_up_option(method, ADAPT_METHODS, "adaptation method")
    run_dir = Path(run_dir)
    if Path(out).resolve() == run_dir.resolve():  # checked first: --force would empty the source run
        raise RunError("the adapted run must go to another folder than its source")
    predictor = Predictor(run_dir, device=device, bounded=True)
    source_stats = load_bn_statistics(run_dir)
    if source_stats is None and method != "adabn_plain":
        raise RunError(
            f"{run_dir}: the run holds no BatchNorm statistics of its training images "
            f"(bn_source.safetensors, written by medtl train since 0.1; or the encoder has no BatchNorm): "
            f"use --method adabn_plain"
        )
    x, keys, errors = target_inputs(predictor, [Path(f) for f in files])
    runtime = predictor.runtime
    generator = torch.Generator().manual_seed(seed)

    def batches():
        # large batches: moments closer to the whole set's
        for idx in torch.randperm(len(x), generator=generator).split(64):
            yield x[idx].to(runtime.device)

    options = {"epochs": epochs} if method == "tent" else {}
    model = adapt(predictor.model, method, batches, source_stats, runtime, **options)
    run = write_adapted_run(run_dir, out, force, model, predictor)
    record = {
        "adapted_from": str(run_dir.resolve()),
        "source_weights_sha256": file_sha256(run_dir / RunDir.MODEL),
        "method": method,
        "target_images": len(keys),
        "target_inputs": len(x),
        "skipped_files": len(errors),
        "target_keys_sha256": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest(),
        "epochs": epochs if method == "tent" else None,
        "seed": seed,
        "medtl_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kept_from_source": "temperature, operating point and out-of-distribution detector (no target labels)",
    }
    run.write_json(RunDir.ADAPTATION, record)
    log.info("%s: %s on %d target images -> %s", run_dir.name, method, len(keys), run.path)
    record["errors"] = errors
    return record


def write_adapted_run(
    run_dir: Path, out: str | Path, force: bool, model: torch.nn.Module, predictor: Predictor
) -> RunDir:
    """The new run ``out``: the source run's :data:`RUN_FILES`, the adapted ``model``'s weights saved with the
    source's classes, preprocessing and decision (``predictor``), and the checksums."""
    run = RunDir.create(out, force)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, run / name)
    model.cpu()
    model.to(memory_format=torch.contiguous_format)
    save_model(
        model,
        run / RunDir.MODEL,
        predictor.encoder,
        predictor.class_names,
        predictor.preprocessing,
        predictor.decision.temperature,
        predictor.decision.operating_point,
        predictor.multi_label,
    )
    run.write_checksums()
    return run


__all__ = ["adapt_run", "target_inputs", "write_adapted_run"]
