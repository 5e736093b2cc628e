"""``run_experiment``: manifest in, a complete run folder out (config, model, metrics, overlays)."""

from __future__ import annotations

import csv
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from medtl.checkpoint import save_model
from medtl.config import ExperimentConfig, to_dict, to_plain, validate_config
from medtl.data import create_dataset, decode_records, read_manifest, split_by_patient
from medtl.errors import ConfigError, MedtlInputError, RunExistsError
from medtl.eval.metrics import compute_classification_metrics
from medtl.models import create_encoder, resolve_preprocessing
from medtl.train.fit import fit, predict_probs
from medtl.transforms import create_transforms

log = logging.getLogger("medtl.train")


def prepare_run_dir(out: str | Path, force: bool) -> Path:
    """Create ``out``; refuse to touch a non-empty folder unless ``force`` (then it is emptied)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunExistsError(f"{out} already holds a run; choose another --out or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_experiment(cfg: ExperimentConfig, out: str | Path, force: bool = False) -> Path:
    """Fine-tune, evaluate on the held-out patients and explain; write everything to ``out``.

    ``out`` receives ``config.yaml``, ``model.safetensors``, ``metrics.json``, ``history.csv``,
    ``splits.csv``, ``skipped.csv`` (files or rows that could not be used) and ``overlays/``.
    """
    validate_config(cfg)
    if not cfg.data.manifest:
        raise ConfigError(None, "no manifest given", "data.manifest (CLI: --manifest PATH)")
    t_start = time.perf_counter()
    manifest = read_manifest(cfg.data.manifest)
    out = prepare_run_dir(out, force)
    torch.manual_seed(cfg.train.seed)
    model = create_encoder(cfg.encoder.name, pretrained=cfg.encoder.pretrained, num_classes=len(manifest.class_names),
                           weights_file=cfg.encoder.weights_file, drop_rate=cfg.encoder.drop_rate)
    pre = resolve_preprocessing(model, cfg.encoder.input_size)
    deterministic, final_train = create_transforms(cfg.data, pre, train=True)
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    log.info("%r; encoder %s (%s), input %d px", manifest, cfg.encoder.name,
             model.pretrained_cfg["weights_source"], pre.input_size)
    samples, problems = decode_records(manifest.records, deterministic)
    problems = manifest.problems + problems
    if not samples:
        raise MedtlInputError(manifest.path, "no image in the manifest could be read")
    parts = split_by_patient([s["label"] for s in samples], [s["patient_id"] for s in samples],
                             cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed)
    sets = {name: [samples[i] for i in idx] for name, idx in parts.items()}
    train_ds = create_dataset(sets["train"], final_train)
    val_ds, test_ds = create_dataset(sets["val"], final_eval), create_dataset(sets["test"], final_eval)
    result = fit(model, train_ds, val_ds, cfg.train, num_classes=len(manifest.class_names))

    metrics = {"class_names": manifest.class_names, "best_epoch": result.best_epoch,
               "precision": result.precision, "device": result.device}
    for name, ds in (("val", val_ds), ("test", test_ds)):
        y, p = predict_probs(model, ds, cfg.train.batch_size, result.device, "fp32")
        metrics[name] = compute_classification_metrics(y, p)
    for name, part in sets.items():
        metrics.setdefault(name, {})
        metrics[name].update(n_images=len(part), n_patients=len({s["patient_id"] for s in part}),
                             label_counts={c: sum(s["label"] == i for s in part)
                                           for i, c in enumerate(manifest.class_names)})
    metrics["n_skipped"] = len(problems)

    model.cpu()
    save_model(model, out / "model.safetensors", cfg.encoder.name, manifest.class_names, pre)
    resolved = to_dict(cfg)
    resolved["data"]["manifest"] = str(Path(cfg.data.manifest).resolve())
    resolved["resolved"] = {"class_names": manifest.class_names, "preprocessing": asdict(pre),
                            "weights_source": model.pretrained_cfg["weights_source"], "precision": result.precision,
                            "medtl_version": _version(), "torch": torch.__version__, "python": platform.python_version()}
    (out / "config.yaml").write_text(yaml.safe_dump(to_plain(resolved), sort_keys=False))
    _write_csv(out / "history.csv", result.history)
    _write_csv(out / "splits.csv", [{"image": s["path"], "label": manifest.class_names[s["label"]], "split": name}
                                    for name, part in sets.items() for s in part])
    _write_csv(out / "skipped.csv", [{"where": p.where, "reason": p.reason} for p in problems], ["where", "reason"])

    from medtl.inference import load_run
    predictor = load_run(out)
    overlays = out / "overlays"
    overlays.mkdir()
    for k, s in enumerate(sets["test"][: cfg.explain.n_overlays]):
        expl = predictor.explain(s["path"])
        name = f"test_{k:02d}_true-{manifest.class_names[s['label']]}_pred-{expl.prediction.label}.png"
        expl.save(overlays / name)
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(to_plain(metrics), indent=2))
    log.info("test AUC %s, accuracy %.3f on %d images of %d patients; run written to %s",
             _fmt(metrics["test"]["auc"]), metrics["test"]["accuracy"], metrics["test"]["n_images"],
             metrics["test"]["n_patients"], out)
    return out


def _version() -> str:
    from medtl import __version__
    return __version__


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
