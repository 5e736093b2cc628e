"""Patient-level stratified k-fold cross-validation, for data sets where one test split is too noisy.

    python pipelines/cross_validate.py --data DATA --out DIR [--folds 5] [--input-size 64] [--config exp.yaml] [--seed 0]

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
import torch
from scipy import stats

from medtl.cli import report_errors
from medtl.config import load_config
from medtl.data import create_dataset, kfold_by_patient, split_by_patient, store_options
from medtl.eval import compute_classification_metrics
from medtl.models import create_model
from medtl.predict import predict_probs
from medtl.train import fit, prepare_data, read_data
from medtl.transforms import create_transforms

METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, help="encoder input side in pixels (default: the configuration's)")
    p.add_argument("--config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = load_config(args.config, data={"path": args.data},
                      **({"encoder": {"input_size": args.input_size}} if args.input_size else {}))
    manifest = read_data(cfg.data)
    manifest.splits = None  # pool everything: the folds are the splits
    n_classes = len(manifest.class_names)
    _, pre = create_model(cfg.encoder, n_classes, pretrained=False)
    prepared = prepare_data(cfg.data, pre, args.seed, manifest)
    studies = [s for part in prepared.sets.values() for s in part]
    labels = np.array([s["label"] for s in studies])
    patients = np.array([s["patient_id"] for s in studies])
    _, final_train = create_transforms(cfg.data, pre, train=True)
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    agg = (cfg.data.slice_aggregation, cfg.data.top_k)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (rest, test) in enumerate(kfold_by_patient(labels, patients, args.folds, args.seed)):
        t0 = time.perf_counter()
        inner = split_by_patient(labels[rest], patients[rest], val_fraction=0.2, test_fraction=0.2, seed=args.seed)
        train_idx = rest[np.concatenate([inner["train"], inner["test"]])]  # the inner test goes back to training
        val_idx = rest[inner["val"]]
        torch.manual_seed(args.seed)
        model, _ = create_model(cfg.encoder, n_classes)
        store = store_options(cfg.data)
        result = fit(model, create_dataset([studies[i] for i in train_idx], final_train, agg, **store),
                     create_dataset([studies[i] for i in val_idx], final_eval, agg, **store), cfg.train, n_classes)
        y, prob = predict_probs(model, create_dataset([studies[i] for i in test], final_eval, agg, **store),
                                result.eval_runtime(), 64)
        m = compute_classification_metrics(y, prob)
        row = {"fold": k, "n_test": len(test), **{name: m.get(name) for name in METRICS},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"fold {k + 1}/{args.folds}: " + ", ".join(f"{n} {row[n]:.3f}" for n in METRICS if row[n] is not None),
              flush=True)
    with open(args.out / "folds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"{args.folds}-fold patient-level cross-validation of {Path(args.data).name} "
             f"({len(studies)} images, {len(set(patients.tolist()))} patients)", "",
             "| metric | mean | 95% CI (t, over folds) |", "|---|---|---|"]
    for name in METRICS:
        v = np.array([r[name] for r in rows if r[name] is not None], dtype=float)
        if len(v) < 2:
            continue
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        lines.append(f"| {name} | {v.mean():.3f} | {v.mean() - half:.3f}–{v.mean() + half:.3f} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(report_errors(main))
