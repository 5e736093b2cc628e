"""``run_experiment``: a data set in, a complete run folder out (config, model, metrics, overlays).

The folder's files are named and written through :class:`medtl.run.RunDir`; the decision a run answers
by is chosen on validation data here (:meth:`medtl.predict.Decision.fit`) and saved with the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from dataclasses import asdict
from pathlib import Path

import monai
import timm
import torch
from PIL import Image

from medtl.adapt.batchnorm import batchnorms, bn_statistics, save_bn_statistics
from medtl.config import ExperimentConfig, to_dict, validate_config
from medtl.data import create_dataset, store_options
from medtl.data.dataset import iterate_batches, study_index
from medtl.data.manifest import FINDINGS_SEPARATOR, is_multi_label, label_counts, label_text, positive_class
from medtl.explain import explain_input
from medtl.metrics import (
    best_balanced_accuracy,
    compute_binary_metrics,
    compute_classification_metrics,
    compute_multilabel_metrics,
)
from medtl.models import Preprocessing, check_encoder, is_volume_model
from medtl.models.checkpoint import save_model
from medtl.predict.forward import batched_logits, predict_logits
from medtl.predict.ood import OODDetector, study_scores
from medtl.predict.post import Decision, Logits, aggregate_slices
from medtl.run import RunDir
from medtl.runtime import Runtime, distributed
from medtl.train.data import PreparedData, prepare_data, prepare_unlabelled, read_data
from medtl.train.feature_cache import cached_features
from medtl.train.recipe import create_seeded_model, train_model
from medtl.train.stages import from_scratch
from medtl.train.tracking import RunMonitor, follow_run
from medtl.train.trainer import FitResult
from medtl.transforms import create_transforms, display_image, prepare_inputs
from medtl.version import __version__

log = logging.getLogger("medtl.train")


def run_experiment(cfg: ExperimentConfig, out: str | Path, force: bool = False, resume: bool = False) -> Path:
    """Fine-tune, evaluate on the held-out patients and explain; write everything to ``out``.

    ``out`` receives ``config.yaml`` and ``status.json`` at once, ``train.log``, ``tensorboard/`` and
    ``checkpoint.pt`` (every epoch) as training goes, then ``model.safetensors``, ``metrics.json``,
    ``history.csv``, ``splits.csv``, ``skipped.csv`` (files or rows that could not be used) and ``overlays/``
    (:class:`medtl.run.RunDir` names them all; :mod:`medtl.train.tracking` follows the run). ``resume``: continue
    the unfinished run in ``out`` from its checkpoint, with ``cfg`` read from its ``config.yaml``
    (:func:`resume_experiment`). Under ``torchrun`` every process trains and only rank 0 writes.
    """
    validate_config(cfg)
    check_encoder(cfg.encoder)
    if not cfg.encoder.pretrained and cfg.encoder.weights_file is None:
        cfg = dataclasses.replace(cfg, train=from_scratch(cfg.train))
        log.info(
            "random initialisation: every layer trains at train.lr and BatchNorm statistics are learnt (strategy full)"
        )
    rank, _ = distributed()
    if rank != 0:
        run = RunDir(out)
    elif resume:
        run = RunDir.for_resume(out)
    else:
        run = RunDir.create(out, force)
        run.write_config(starting_config(cfg))
    with follow_run(run, cfg, resume) as monitor:
        train_run(run, cfg, monitor)
    return run.path


def resume_experiment(run_dir: str | Path) -> Path:
    """Continue the unfinished run in ``run_dir`` (its configuration, its checkpoint): the same weights as a run
    that was never stopped, on the same machine."""
    cfg, _ = RunDir.for_resume(run_dir).read_config()
    return run_experiment(cfg, run_dir, resume=True)


def starting_config(cfg: ExperimentConfig) -> dict:
    """``config.yaml`` as a run starts (what it resolves is added when it finishes): data and weight paths made
    absolute, so the run can be resumed from any folder."""
    record = to_dict(cfg)
    record["data"]["path"] = str(Path(cfg.data.path).resolve())
    if cfg.encoder.weights_file:
        record["encoder"]["weights_file"] = str(Path(cfg.encoder.weights_file).resolve())
    return record


def train_run(run: RunDir, cfg: ExperimentConfig, monitor: RunMonitor) -> None:
    """The data read and split, the model trained (``monitor`` follows it and holds the checkpoint it resumes
    from), then on rank 0 everything that follows (:func:`finish_run`) and ``metrics.json``."""
    manifest = read_data(cfg.data)
    names, multi = manifest.class_names, manifest.multi_label
    model, pre = create_seeded_model(cfg, len(names))
    prepared = prepare_data(cfg.data, pre, cfg.train.seed, manifest, cfg.train.workers)
    log.info(
        "encoder %s (%s), input %d px; split %s",
        cfg.encoder.name,
        model.pretrained_cfg["weights_source"],
        pre.input_size,
        prepared.split_source,
    )
    datasets = prepared.datasets(cfg.data, pre)
    unlabelled = prepare_unlabelled(cfg.data, pre, prepared, cfg.train.workers)
    model, result = train_model(
        cfg, datasets[0], datasets[1], len(names), model=model, unlabelled=unlabelled, monitor=monitor
    )
    if distributed()[0] != 0:
        return
    metrics = finish_run(run, cfg, model, pre, prepared, datasets, result)
    metrics["seconds"] = round(monitor.seconds(), 1)
    run.write_json(RunDir.METRICS, metrics)
    monitor.summary(metrics)
    test = metrics["test"]
    log.info(
        "test AUC %s, %s %.3f on %d images of %d patients; run written to %s",
        _fmt(test["auc"]),
        "every finding right" if multi else "accuracy",
        test["accuracy"],
        test["n_images"],
        test["n_patients"],
        run.path,
    )


def finish_run(
    run: RunDir,
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    pre: Preprocessing,
    prepared: PreparedData,
    datasets: tuple,
    result: FitResult,
) -> dict:
    """What follows training, on rank 0: the decision and the refusal threshold chosen on validation data (the
    run's own answers are calibrated and decided at an operating point without ``medtl evaluate``), the test
    metrics, overlays, and every file of the run but ``metrics.json``; returns the metrics. ``datasets``: the
    (training, validation, test) data sets."""
    names = prepared.manifest.class_names
    runtime, bs = result.eval_runtime(), max(32, result.batch_size)
    _, val_ds, test_ds = datasets
    val_logits = predict_logits(model, val_ds, runtime, bs)
    decision = Decision.fit(val_logits, names, positive=positive_class(cfg.data, prepared.manifest))
    train_eval = create_dataset(
        prepared.sets["train"],
        create_transforms(cfg.data, pre, train=False)[1],
        (cfg.data.slice_aggregation, cfg.data.top_k),
        **store_options(cfg.data),
    )
    detector = fit_ood(model, train_eval, cfg, val_ds, runtime, bs)
    bn_stats = training_bn_statistics(model, train_eval, runtime, bs)
    metrics = run_metrics(model, result, prepared, (val_logits, test_ds), runtime, bs, decision)
    if detector is not None:
        metrics["ood"] = detector.describe()
    if prepared.manifest.kind != "medmnist" and not is_volume_model(model):  # overlays need files and a 2D map
        write_overlays(
            model,
            prepared.sets["test"][: cfg.explain.n_overlays],
            create_transforms(cfg.data, pre, train=False)[1],
            runtime,
            decision,
            cfg,
            run / RunDir.OVERLAYS,
        )
    save_final_model(run, model, cfg.encoder.name, names, pre, decision)
    if detector is not None:
        detector.save(run / RunDir.OOD)
    if bn_stats:
        save_bn_statistics(bn_stats, run.path)
    write_run_files(run, cfg, prepared, result, pre, model.pretrained_cfg["weights_source"])
    run.write_checksums()
    return metrics


def training_bn_statistics(model: torch.nn.Module, train_eval, runtime: Runtime, batch_size: int) -> dict | None:
    """The BatchNorm layers' input moments on the training images (``train_eval``: read without augmentation),
    what ``medtl adapt`` matches a new site to; None for a model without BatchNorm."""
    if not batchnorms(model):
        return None
    return bn_statistics(model, (b["image"] for b in iterate_batches(train_eval, batch_size, runtime.device)), runtime)


def save_final_model(
    run: RunDir, model: torch.nn.Module, encoder: str, names: list[str], pre: Preprocessing, decision: Decision
) -> None:
    """Save the trained ``model`` (moved to the CPU, in contiguous layout) to the run's ``model.safetensors`` with
    the encoder's name, the class ``names``, the preprocessing record and the ``decision``."""
    model.cpu()
    model.to(memory_format=torch.contiguous_format)
    save_model(
        model,
        run / RunDir.MODEL,
        encoder,
        names,
        pre,
        decision.temperature,
        decision.operating_point,
        decision.multi_label,
    )


def fit_ood(
    model: torch.nn.Module, train_eval, cfg: ExperimentConfig, val_ds, runtime: Runtime, batch_size: int
) -> OODDetector | None:
    """The out-of-distribution detector (``train.ood``) of the training images' encoder features
    (``train_eval``: read without augmentation), its threshold set on the validation studies; None when
    ``train.ood`` is off."""
    if cfg.train.ood == "off":
        return None
    train_f, train_y = cached_features(model, train_eval, runtime, batch_size)
    if train_y.ndim == 2:  # multi-label: the features of all training images as one group
        train_y = torch.zeros(len(train_y), dtype=torch.long)
    detector = OODDetector.fit(train_f, train_y, cfg.train.ood, seed=cfg.train.seed)
    val_f, _ = cached_features(model, val_ds, runtime, batch_size)
    detector.calibrate(study_scores(detector.score(val_f), study_index(val_ds)), cfg.train.ood_quantile)
    log.info(
        "out-of-distribution refusal (%s): threshold %.4f, the %g quantile of %d validation studies",
        detector.method,
        detector.threshold,
        detector.quantile,
        len(detector.val_scores),
    )
    return detector


def run_metrics(
    model: torch.nn.Module,
    result: FitResult,
    prepared: PreparedData,
    datasets: tuple,
    runtime: Runtime,
    batch_size: int,
    decision: Decision,
) -> dict:
    """``metrics.json``'s content: how training went, validation and test metrics per study (through
    the one prediction path, calibrated as ``decision`` says), the test decisions at its operating point
    against the best any threshold allows, and images, patients and labels per split. ``datasets``:
    (validation, test), each a data set or its :class:`~medtl.predict.Logits` computed already."""
    names = prepared.manifest.class_names
    metrics = training_record(result)
    metrics.update(class_names=names, split=prepared.split_source, temperature=round(decision.temperature or 1.0, 4))
    for name, ds in zip(("val", "test"), datasets):
        logits = ds if isinstance(ds, Logits) else predict_logits(model, ds, runtime, batch_size)
        y, p = logits.study_probs(decision.temperature or 1.0)
        metrics[name] = (
            compute_multilabel_metrics(y, p, names, decision.thresholds and list(decision.thresholds))
            if decision.multi_label
            else compute_classification_metrics(y, p)
        )
    if decision.multi_label:
        metrics["multi_label"] = True
        metrics["test"]["accuracy"] = metrics["test"]["exact_match"]  # (all findings right) for the summary line
        if decision.thresholds is not None:
            metrics["test"]["decision"] = {
                "thresholds": dict(zip(names, decision.thresholds)),
                "rules": dict(zip(names, decision.rules)),
            }
    elif decision.threshold is not None:
        yb, pb = decision.positive_view(y, p)
        at_op = compute_binary_metrics(yb, pb, decision.threshold)
        metrics["test"]["decision"] = {
            **decision.operating_point,
            **{k: at_op[k] for k in ("sensitivity", "specificity", "balanced_accuracy")},
            "best_balanced_accuracy": best_balanced_accuracy(yb, pb),
        }
    for name, part in prepared.sets.items():
        metrics.setdefault(name, {})
        metrics[name].update(
            n_images=len(part),
            n_patients=len({s["patient_id"] for s in part}),
            label_counts=label_counts([s["label"] for s in part], names),
        )
    metrics["n_skipped"] = len(prepared.problems)
    return metrics


def training_record(result: FitResult) -> dict:
    """How training went, for ``metrics.json``: best epoch, strategy and why, precision, device, throughput,
    batch; ``auto``'s candidates and an ensemble's soup where there were any."""
    record = {
        "best_epoch": result.best_epoch,
        "strategy": result.strategy,
        "strategy_reason": result.strategy_reason,
        "precision": result.precision,
        "precision_choice": result.precision_choice,
        "device": result.device,
        "world_size": result.world_size,
        "train_images_per_s": round(result.train_images_per_s, 2),
        "batch": result.batch,
    }
    if result.candidates:
        record["auto_candidates"] = result.candidates
    if result.soup:
        record["ensemble"] = result.soup
    return record


def input_record(train: list[dict]) -> dict:
    """What the model was trained on, from its decoded training studies: modalities, dimensions, colour and
    the smallest side (inputs outside it are refused; :func:`medtl.predict.refusal.input_refusal`)."""
    return {
        "modalities": sorted({s.get("scan_modality", "UNKNOWN") for s in train}),
        "dimensions": sorted({int(s.get("scan_ndim", 2)) for s in train}),
        "colour_inputs": sum(bool(s.get("scan_colour")) for s in train),
        "grey_inputs": sum(not s.get("scan_colour") for s in train),
        "min_side": min((int(s["scan_min_side"]) for s in train if s.get("scan_min_side")), default=None),
    }


def write_run_files(
    run: RunDir,
    cfg: ExperimentConfig,
    prepared: PreparedData,
    result: FitResult,
    pre: Preprocessing,
    weights_source: str,
) -> None:
    """``config.yaml`` (the resolved configuration and what the run resolved), ``history.csv``,
    ``splits.csv`` and ``skipped.csv``."""
    sets, names = prepared.sets, prepared.manifest.class_names
    resolved = to_dict(cfg)
    resolved["data"]["path"] = str(Path(cfg.data.path).resolve())
    resolved["resolved"] = {
        "class_names": names,
        "preprocessing": asdict(pre),
        "strategy": result.strategy,
        "strategy_reason": result.strategy_reason,
        "input_record": input_record(sets["train"]),
        "weights_source": weights_source,
        "precision": result.precision,
        "batch": result.batch,
        "environment": environment(),
    }
    run.write_config(resolved)
    run.write_csv(RunDir.HISTORY, result.history)
    run.write_csv(
        RunDir.SPLITS,
        [
            {"image": s["path"], "label": label_text(s["label"], names), "split": name}
            for name, part in sets.items()
            for s in part
        ],
    )
    run.write_csv(
        RunDir.SKIPPED, [{"where": p.where, "reason": p.reason} for p in prepared.problems], ["where", "reason"]
    )


def write_overlays(
    model: torch.nn.Module,
    studies: list[dict],
    final,
    runtime: Runtime,
    decision: Decision,
    cfg: ExperimentConfig,
    out: Path,
) -> None:
    """Saliency overlays of decoded test studies, named by true and decided class (the run's ``decision``, as
    ``medtl predict`` decides). A volume read slice by slice is drawn on the slice that scores highest for
    the decided class (multi-label: the map of the most probable finding)."""
    out.mkdir(exist_ok=True)
    names = list(decision.class_names)
    for k, study in enumerate(studies):
        x, parts = prepare_inputs(study, final)
        multi = is_multi_label(study["label"])
        per_input = decision.probabilities(batched_logits(model, x, runtime))
        p = aggregate_slices(per_input, cfg.data.slice_aggregation, cfg.data.top_k)
        target = int(p.argmax()) if multi else names.index(decision.label(p))
        best = int(per_input[:, target].argmax())
        _, overlay = explain_input(
            model,
            x[best : best + 1],
            display_image(parts[best]),
            target,
            cfg.explain.method,
            runtime,
            cfg.explain.alpha,
        )
        true = label_text(study["label"], names).replace(FINDINGS_SEPARATOR, "+").replace(" ", "-")
        name = f"test_{k:02d}_true-{true}_{'map' if multi else 'pred'}-{names[target]}.png"
        Image.fromarray(overlay).save(out / name)


def environment() -> dict:
    """Versions that decide a run's numbers: medtl, Python, torch, timm, MONAI, the CPU/GPU."""
    env = {
        "medtl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "monai": monai.__version__,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


__all__ = [
    "run_experiment",
    "finish_run",
    "training_bn_statistics",
    "save_final_model",
    "fit_ood",
    "run_metrics",
    "training_record",
    "input_record",
    "write_run_files",
    "write_overlays",
    "environment",
]
