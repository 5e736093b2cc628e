"""Patient-level stratified k-fold cross-validation, for data sets where one test split is too noisy.

    python pipelines/cross_validate.py --data DATA --out DIR [--folds 5] [--input-size 64] [--config exp.yaml]
        [--seed 0]

Every patient is tested exactly once. In each fold, a validation share of the training patients
picks the epoch. Writes DIR/folds.csv (metrics per fold) and DIR/summary.md (the mean of each
metric with a 95% t-interval over folds). A MedMNIST file's own split is ignored: all its images
are pooled.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from medtl.cli import report_errors
from medtl.config import ExperimentConfig, load_config
from medtl.data import kfold_by_patient, split_by_patient
from medtl.eval import compute_classification_metrics
from medtl.models import Preprocessing, create_model
from medtl.predict.forward import predict_probs
from medtl.train import create_datasets, create_seeded_model, prepare_data, read_data, train_model

METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, help="encoder input side in pixels (default: the configuration's)")
    p.add_argument("--config")
    return p.parse_args(argv)


def run_fold(
    cfg: ExperimentConfig,
    pre: Preprocessing,
    studies: list[dict],
    labels: np.ndarray,
    patients: np.ndarray,
    rest: np.ndarray,
    test: np.ndarray,
    n_classes: int,
    seed: int,
) -> dict:
    """Train on the fold's ``rest`` (a validation share of its patients picks the epoch), the encoder's head
    initialised with ``seed``; the metrics on its ``test`` studies."""
    t0 = time.perf_counter()
    inner = split_by_patient(labels[rest], patients[rest], val_fraction=0.2, test_fraction=0.2, seed=seed)
    train_idx = rest[np.concatenate([inner["train"], inner["test"]])]  # the inner test goes back to training
    val_idx = rest[inner["val"]]
    model, _ = create_seeded_model(cfg, n_classes, seed=seed)
    model, result = train_model(
        cfg, [studies[i] for i in train_idx], [studies[i] for i in val_idx], n_classes, model=model
    )
    (test_ds,) = create_datasets(cfg.data, pre, [studies[i] for i in test])
    y, prob = predict_probs(model, test_ds, result.eval_runtime(), 64)
    m = compute_classification_metrics(y, prob)
    return {
        "n_test": len(test),
        **{name: m.get(name) for name in METRICS},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summary_lines(rows: list[dict], folds: int, data: str, n_images: int, n_patients: int) -> list[str]:
    """summary.md: the mean of each metric with a 95% t-interval over folds."""
    lines = [
        f"{folds}-fold patient-level cross-validation of {Path(data).name} ({n_images} images, {n_patients} patients)",
        "",
        "| metric | mean | 95% CI (t, over folds) |",
        "|---|---|---|",
    ]
    for name in METRICS:
        v = np.array([r[name] for r in rows if r[name] is not None], dtype=float)
        if len(v) < 2:
            continue
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        lines.append(f"| {name} | {v.mean():.3f} | {v.mean() - half:.3f}–{v.mean() + half:.3f} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = load_config(
        args.config,
        data={"path": args.data},
        **({"encoder": {"input_size": args.input_size}} if args.input_size else {}),
    )
    manifest = read_data(cfg.data)
    manifest.splits = None  # pool everything: the folds are the splits
    n_classes = len(manifest.class_names)
    _, pre = create_model(cfg.encoder, n_classes, pretrained=False)  # (its preprocessing record)
    prepared = prepare_data(cfg.data, pre, args.seed, manifest)
    studies = [s for part in prepared.sets.values() for s in part]
    labels = np.array([s["label"] for s in studies])
    patients = np.array([s["patient_id"] for s in studies])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (rest, test) in enumerate(kfold_by_patient(labels, patients, args.folds, args.seed)):
        row = {"fold": k, **run_fold(cfg, pre, studies, labels, patients, rest, test, n_classes, args.seed)}
        rows.append(row)
        print(
            f"fold {k + 1}/{args.folds}: " + ", ".join(f"{n} {row[n]:.3f}" for n in METRICS if row[n] is not None),
            flush=True,
        )
    with open(args.out / "folds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = summary_lines(rows, args.folds, args.data, len(studies), len(set(patients.tolist())))
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(report_errors(main))
