"""``run_experiment``: a data set in, a complete run folder out (config, model, metrics, overlays)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import monai
import numpy as np
import timm
import torch
import yaml
from PIL import Image

from medtl import __version__
from medtl.checkpoint import save_model
from medtl.config import DataConfig, ExperimentConfig, to_dict, to_plain, validate_config
from medtl.data import Manifest, Problem, check_split_classes, create_dataset, decode_records, read_dataset, \
    read_unlabelled, split_by_patient
from medtl.errors import ConfigError, MedtlInputError, RunExistsError
from medtl.data.dataset import decode_workers, iterate_batches, store_options, study_index
from medtl.data.manifest import FINDINGS_SEPARATOR, is_multi_label, label_counts, label_text
from medtl.eval.metrics import best_balanced_accuracy, compute_binary_metrics, compute_classification_metrics, \
    compute_multilabel_metrics
from medtl.explain import explain_input
from medtl.models import Preprocessing, create_model, is_volume_model
from medtl.adapt import batchnorms, bn_statistics, save_bn_statistics
from medtl.ood import OOD_FILE, OODDetector, study_scores
from medtl.predict import Logits, batched_logits, extract_features, fit_decision, predict_logits, to_probabilities
from medtl.runtime import Runtime, distributed
from medtl.train.fit import FitResult, fit, from_scratch
from medtl.transforms import aggregate_slices, create_transforms, display_image, prepare_inputs

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


@dataclass
class PreparedData:
    """A data set decoded once and split: what :func:`fit` and the evaluation need."""

    manifest: Manifest
    sets: dict[str, list[dict]]  # "train"/"val"/"test" -> decoded studies
    problems: list[Problem]  # rows and files that were skipped
    split_source: str  # "fixed (from the file)" or "patient-level stratified, seed N"

    def datasets(self, data: DataConfig, pre: Preprocessing, train_subset: list[int] | None = None):
        """(train, val, test) MONAI datasets; ``train_subset`` picks training studies by index."""
        _, final_train = create_transforms(data, pre, train=True)
        _, final_eval = create_transforms(data, pre, train=False)
        train = self.sets["train"] if train_subset is None else [self.sets["train"][i] for i in train_subset]
        agg, store = (data.slice_aggregation, data.top_k), store_options(data)
        return (create_dataset(train, final_train, agg, **store), create_dataset(self.sets["val"], final_eval, agg, **store),
                create_dataset(self.sets["test"], final_eval, agg, **store))


def read_data(data: DataConfig) -> Manifest:
    """The data set named by ``data.path`` (a manifest .csv, an image folder or a MedMNIST .npz)."""
    if not data.path:
        raise ConfigError(None, "no data given", "data.path (CLI: --data PATH: a manifest .csv, image folder or .npz)")
    return read_dataset(data.path, classes=data.classes, allow_outside_paths=data.allow_outside_paths,
                        label_columns=data.label_columns)


def prepare_data(data: DataConfig, pre: Preprocessing, seed: int = 0, manifest: Manifest | None = None,
                 workers: int | str = "auto") -> PreparedData:
    """Read the data set of ``data.path``, decode every image once and split it by patient.

    A MedMNIST file keeps its own split; other data sets get a patient-level, label-stratified
    split. Every class must have at least 2 examples in every split (refused otherwise). The files are
    read by ``workers`` processes (``train.workers``; see :func:`medtl.data.dataset.decode_workers`).
    """
    manifest = manifest or read_data(data)
    deterministic, _ = create_transforms(data, pre, train=False)
    log.info("%r; decoding images", manifest)
    samples, problems = decode_records(manifest.records, deterministic, cache_folder(data, pre),
                                       decode_workers(workers, len(manifest.records)))
    problems = manifest.problems + problems
    if not samples:
        raise MedtlInputError(manifest.path, "no image in the data set could be read")
    labels = [s["label"] for s in samples]
    if manifest.splits:
        kept = {s["path"]: i for i, s in enumerate(samples)}
        parts = {name: np.asarray([kept[manifest.records[i]["path"]] for i in idx
                                   if manifest.records[i]["path"] in kept]) for name, idx in manifest.splits.items()}
        how = "fixed (from the file)"
    else:
        parts = split_by_patient(labels, [s["patient_id"] for s in samples], data.val_fraction, data.test_fraction,
                                 seed)
        how = f"patient-level stratified, seed {seed}"
    check_split_classes(labels, parts, len(manifest.class_names))
    sets = {name: [samples[i] for i in idx] for name, idx in parts.items()}
    return PreparedData(manifest, sets, problems, how)


def prepare_unlabelled(data: DataConfig, pre: Preprocessing, prepared: PreparedData, workers: int | str = "auto"):
    """The data set of ``data.unlabelled`` (None without it): read and decoded like the labelled images, less
    any image that is also in the validation or test split (it would leak into training)."""
    if not data.unlabelled:
        return None
    records = read_unlabelled(data.unlabelled, data.allow_outside_paths)
    held = {str(s.get("path", "")) for name in ("val", "test") for s in prepared.sets[name]}
    kept = [r for r in records if str(r.get("path", r["image"])) not in held]
    if len(kept) < len(records):
        log.warning("data.unlabelled: %d image(s) of the validation or test split left out", len(records) - len(kept))
    deterministic, final = create_transforms(data, pre, train=False)
    samples, problems = decode_records(kept, deterministic, cache_folder(data, pre),
                                       decode_workers(workers, len(kept)))
    prepared.problems.extend(problems)
    log.info("data.unlabelled: %d images for semi-supervised training (%d unreadable)", len(samples), len(problems))
    return create_dataset(samples, final, (data.slice_aggregation, data.top_k), **store_options(data))


def cache_folder(data: DataConfig, pre: Preprocessing) -> str | None:
    """``data.cache_dir``/<hash of every setting that shapes a decoded input>: runs with other intensity,
    colour, volume or size settings never read each other's cached inputs."""
    if not data.cache_dir:
        return None
    shaping = {k: v for k, v in dataclasses.asdict(data).items()
               if k not in ("path", "cache_dir", "val_fraction", "test_fraction", "augment", "flip", "color_jitter",
                            "classes", "allow_outside_paths", "slice_aggregation", "top_k", "input_store")}
    key = json.dumps({"data": shaping, "input_size": pre.input_size, "in_chans": pre.in_chans,
                      "spatial_dims": pre.spatial_dims, "medtl": CACHE_FORMAT}, sort_keys=True, default=str)
    return str(Path(data.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16])


CACHE_FORMAT = 3  # bump when the decoded samples' content changes


def run_experiment(cfg: ExperimentConfig, out: str | Path, force: bool = False) -> Path:
    """Fine-tune, evaluate on the held-out patients and explain; write everything to ``out``.

    ``out`` receives ``config.yaml``, ``model.safetensors`` (written at every new best epoch, so
    an interrupted run keeps its last good weights), ``metrics.json``, ``history.csv``,
    ``splits.csv``, ``skipped.csv`` (files or rows that could not be used) and ``overlays/``.
    Under ``torchrun`` every process trains and only rank 0 writes.
    """
    validate_config(cfg)
    if not cfg.encoder.pretrained and cfg.encoder.weights_file is None:
        cfg = dataclasses.replace(cfg, train=from_scratch(cfg.train))
        log.info("random initialisation: every layer trains at train.lr and BatchNorm statistics are learnt "
                 "(strategy full)")
    t_start = time.perf_counter()
    rank, _ = distributed()
    out = prepare_run_dir(out, force) if rank == 0 else Path(out)
    manifest = read_data(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model, pre = create_model(cfg.encoder, len(manifest.class_names))
    prepared = prepare_data(cfg.data, pre, cfg.train.seed, manifest, cfg.train.workers)
    sets = prepared.sets
    log.info("encoder %s (%s), input %d px; split %s", cfg.encoder.name, model.pretrained_cfg["weights_source"],
             pre.input_size, prepared.split_source)
    train_ds, val_ds, test_ds = prepared.datasets(cfg.data, pre)

    multi = manifest.multi_label

    def checkpoint(m, row):
        save_model(m, out / "model.safetensors", cfg.encoder.name, manifest.class_names, pre, multi_label=multi)

    unlabelled = prepare_unlabelled(cfg.data, pre, prepared, cfg.train.workers)
    result = fit(model, train_ds, val_ds, cfg.train, num_classes=len(manifest.class_names), on_improve=checkpoint,
                 unlabelled_ds=unlabelled)
    if rank != 0:
        return out

    runtime = result.eval_runtime()
    bs = max(32, result.batch_size)
    # the decision rule and the refusal threshold, both chosen on validation data: the run's own answers
    # (predict, the web page) are calibrated and decided at an operating point without `medtl evaluate`
    val_logits = predict_logits(model, val_ds, runtime, bs)
    temperature, op = fit_decision(val_logits, len(manifest.class_names))
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    train_eval = create_dataset(prepared.sets["train"], final_eval, (cfg.data.slice_aggregation, cfg.data.top_k),
                                **store_options(cfg.data))  # the training images without augmentation
    detector = fit_ood(model, train_eval, cfg, val_ds, runtime, bs)
    # the BatchNorm layers' input moments on the training images: what `medtl adapt` matches a new site to
    bn_stats = bn_statistics(model, (b["image"] for b in iterate_batches(train_eval, bs, runtime.device)), runtime) \
        if batchnorms(model) else None
    metrics = run_metrics(model, result, prepared, (val_logits, test_ds), runtime, bs, temperature, op)
    if detector is not None:
        metrics["ood"] = detector.describe()
    if manifest.kind != "medmnist" and not is_volume_model(model):  # overlays need files and a 2D map
        write_overlays(model, sets["test"][: cfg.explain.n_overlays], create_transforms(cfg.data, pre, train=False)[1],
                       runtime, manifest.class_names, cfg, out / "overlays")
    model.cpu()
    model.to(memory_format=torch.contiguous_format)
    save_model(model, out / "model.safetensors", cfg.encoder.name, manifest.class_names, pre, temperature, op, multi)
    if detector is not None:
        detector.save(out / OOD_FILE)
    if bn_stats:
        save_bn_statistics(bn_stats, out)
    write_run_files(out, cfg, prepared, result, pre, model.pretrained_cfg["weights_source"])
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(to_plain(metrics), indent=2))
    log.info("test AUC %s, %s %.3f on %d images of %d patients; run written to %s", _fmt(metrics["test"]["auc"]),
             "every finding right" if manifest.multi_label else "accuracy", metrics["test"]["accuracy"], metrics["test"]["n_images"],
             metrics["test"]["n_patients"], out)
    return out


def fit_ood(model: torch.nn.Module, train_eval, cfg: ExperimentConfig, val_ds, runtime: Runtime,
            batch_size: int) -> OODDetector | None:
    """The out-of-distribution detector (``train.ood``) of the training images' encoder features
    (``train_eval``: read without augmentation), its threshold set on the validation studies; None when
    ``train.ood`` is off."""
    if cfg.train.ood == "off":
        return None
    train_f, train_y = extract_features(model, train_eval, runtime, batch_size)
    if train_y.ndim == 2:  # multi-label: the features of all training images as one group
        train_y = torch.zeros(len(train_y), dtype=torch.long)
    detector = OODDetector.fit(train_f, train_y, cfg.train.ood, seed=cfg.train.seed)
    val_f, _ = extract_features(model, val_ds, runtime, batch_size)
    detector.calibrate(study_scores(detector.score(val_f), study_index(val_ds)), cfg.train.ood_quantile)
    log.info("out-of-distribution refusal (%s): threshold %.4f, the %g quantile of %d validation studies",
             detector.method, detector.threshold, detector.quantile, len(detector.val_scores))
    return detector


def run_metrics(model: torch.nn.Module, result: FitResult, prepared: PreparedData, datasets: tuple, runtime: Runtime,
                batch_size: int, temperature: float = 1.0, operating_point: dict | None = None) -> dict:
    """``metrics.json``'s content: how training went, validation and test metrics per study (through
    the one prediction path, calibrated by ``temperature``), the test decisions at ``operating_point``
    against the best any threshold allows, and images, patients and labels per split. ``datasets``:
    (validation, test), each a data set or its :class:`~medtl.predict.Logits` computed already."""
    names = prepared.manifest.class_names
    metrics = {"class_names": names, "best_epoch": result.best_epoch, "strategy": result.strategy,
               "strategy_reason": result.strategy_reason, "precision": result.precision,
               "precision_choice": result.precision_choice, "device": result.device,
               "world_size": result.world_size, "split": prepared.split_source,
               "train_images_per_s": round(result.train_images_per_s, 2), "batch": result.batch}
    if result.candidates:
        metrics["auto_candidates"] = result.candidates
    if result.soup:
        metrics["ensemble"] = result.soup
    metrics["temperature"] = round(float(temperature), 4)
    multi = prepared.manifest.multi_label
    for name, ds in zip(("val", "test"), datasets):
        logits = ds if isinstance(ds, Logits) else predict_logits(model, ds, runtime, batch_size)
        y, p = logits.study_probs(temperature)
        metrics[name] = compute_multilabel_metrics(y, p, names, (operating_point or {}).get("thresholds")) if multi \
            else compute_classification_metrics(y, p)
    if multi:
        metrics["multi_label"] = True
        metrics["test"]["accuracy"] = metrics["test"]["exact_match"]  # (all findings right) for the summary line
        if operating_point is not None:
            metrics["test"]["decision"] = {"thresholds": dict(zip(names, operating_point["thresholds"])),
                                           "rules": dict(zip(names, operating_point["rules"]))}
    elif operating_point is not None and len(names) == 2:
        at_op = compute_binary_metrics(y, p[:, 1], operating_point["threshold"])
        metrics["test"]["decision"] = {**operating_point, **{k: at_op[k] for k in (
            "sensitivity", "specificity", "balanced_accuracy")}, "best_balanced_accuracy": best_balanced_accuracy(y, p[:, 1])}
    for name, part in prepared.sets.items():
        metrics.setdefault(name, {})
        metrics[name].update(n_images=len(part), n_patients=len({s["patient_id"] for s in part}),
                             label_counts=label_counts([s["label"] for s in part], names))
    metrics["n_skipped"] = len(prepared.problems)
    return metrics


def write_run_files(out: Path, cfg: ExperimentConfig, prepared: PreparedData, result: FitResult, pre: Preprocessing,
                    weights_source: str) -> None:
    """``config.yaml`` (the resolved configuration and what the run resolved), ``history.csv``,
    ``splits.csv`` and ``skipped.csv``."""
    sets, names = prepared.sets, prepared.manifest.class_names
    resolved = to_dict(cfg)
    resolved["data"]["path"] = str(Path(cfg.data.path).resolve())
    resolved["resolved"] = {"class_names": names, "preprocessing": asdict(pre),
                            "strategy": result.strategy, "strategy_reason": result.strategy_reason,
                            "input_record": {  # what the model was trained on: inputs outside it are refused by the UI
                                "modalities": sorted({s.get("scan_modality", "UNKNOWN") for s in sets["train"]}),
                                "dimensions": sorted({int(s.get("scan_ndim", 2)) for s in sets["train"]}),
                                "colour_inputs": sum(bool(s.get("scan_colour")) for s in sets["train"]),
                                "grey_inputs": sum(not s.get("scan_colour") for s in sets["train"]),
                                "min_side": min((int(s["scan_min_side"]) for s in sets["train"] if s.get("scan_min_side")),
                                                default=None)},
                            "weights_source": weights_source, "precision": result.precision, "batch": result.batch,
                            "environment": environment()}
    (out / "config.yaml").write_text(yaml.safe_dump(to_plain(resolved), sort_keys=False))
    _write_csv(out / "history.csv", result.history)
    _write_csv(out / "splits.csv", [{"image": s["path"], "label": label_text(s["label"], names), "split": name}
                                    for name, part in sets.items() for s in part])
    _write_csv(out / "skipped.csv", [{"where": p.where, "reason": p.reason} for p in prepared.problems],
               ["where", "reason"])


def write_overlays(model: torch.nn.Module, studies: list[dict], final, runtime: Runtime, class_names: list[str],
                   cfg: ExperimentConfig, out: Path) -> None:
    """Saliency overlays of decoded test studies, named by true and predicted class. A volume read slice
    by slice is drawn on the slice that scores highest for the predicted class."""
    out.mkdir(exist_ok=True)
    for k, study in enumerate(studies):
        x, parts = prepare_inputs(study, final)
        multi = is_multi_label(study["label"])
        per_input = to_probabilities(batched_logits(model, x, runtime), multi_label=multi).numpy()
        label = int(aggregate_slices(per_input, cfg.data.slice_aggregation, cfg.data.top_k).argmax())
        best = int(per_input[:, label].argmax())
        _, overlay = explain_input(model, x[best:best + 1], display_image(parts[best]), label, cfg.explain.method,
                                   runtime, cfg.explain.alpha)
        true = label_text(study["label"], class_names).replace(FINDINGS_SEPARATOR, "+").replace(" ", "-")
        # multi-label: the map of the most probable finding
        name = f"test_{k:02d}_true-{true}_{'map' if multi else 'pred'}-{class_names[label]}.png"
        Image.fromarray(overlay).save(out / name)


def environment() -> dict:
    """Versions that decide a run's numbers: medtl, Python, torch, timm, MONAI, the CPU/GPU."""
    env = {"medtl": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "monai": monai.__version__, "machine": platform.machine(),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env



def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or list(dict.fromkeys(k for row in rows for k in row))  # (rows may differ: e.g. auto's candidates)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
