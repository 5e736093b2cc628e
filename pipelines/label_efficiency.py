"""How many labels does transfer learning save? Train with N labels per class, per strategy and seed.

    python pipelines/label_efficiency.py --data DATA --out DIR [--n-per-class 5,10,25,50,100,all]
        [--strategies scratch,linear_probe,partial,full,auto] [--seeds 0,1,2] [--input-size 64]
        [--config exp.yaml]

DATA is a manifest CSV, an image folder or a MedMNIST .npz. The validation and test splits stay
fixed; the N training examples per class are drawn with the seed. "scratch" is the full strategy
from random initialisation. Writes DIR/results.csv (one row per cell and seed, appended as soon
as a cell finishes, so an interrupted study resumes where it stopped), DIR/results.md (mean ± std
per cell) and DIR/learning_curve.png (test AUC vs labels per class, one line per strategy, 95% CI
bands over seeds).
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

from medtl.config import load_config
from medtl.data import create_dataset
from medtl.eval import compute_auc
from medtl.eval.report import save_study
from medtl.models import create_encoder, resolve_preprocessing
from medtl.train import fit, predict_probs, prepare_data, read_data
from medtl.transforms import create_transforms

FIELDS = ["strategy", "n_per_class", "seed", "test_auc", "test_acc", "seconds"]
log = logging.getLogger("medtl.pipelines")


def subsample(labels: list[int], n_per_class: int | None, seed: int) -> list[int]:
    """Indices of ``n_per_class`` examples of every class (all of them when None), drawn with ``seed``."""
    labels = np.asarray(labels)
    if n_per_class is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        picked += rng.choice(idx, size=min(n_per_class, len(idx)), replace=False).tolist()
    return sorted(picked)


def read_done(path: Path) -> set[tuple[str, str, int]]:
    if not path.is_file():
        return set()
    with open(path) as f:
        return {(r["strategy"], r["n_per_class"], int(r["seed"])) for r in csv.DictReader(f)}


def run_cell(cfg, prepared, pre, n_classes: int, strategy: str, train_idx: list[int], seed: int) -> dict:
    scratch = strategy == "scratch"
    train_cfg = cfg.train.__class__(**{**cfg.train.__dict__, "strategy": "full" if scratch else strategy,
                                       "seed": seed})
    torch.manual_seed(seed)
    model = create_encoder(cfg.encoder.name, pretrained=cfg.encoder.pretrained and not scratch,
                           num_classes=n_classes, weights_file=cfg.encoder.weights_file, drop_rate=cfg.encoder.drop_rate)
    _, final_train = create_transforms(cfg.data, pre, train=True)
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    agg = (cfg.data.slice_aggregation, cfg.data.top_k)
    train = create_dataset([prepared.sets["train"][i] for i in train_idx], final_train, agg)
    val = create_dataset(prepared.sets["val"], final_eval, agg)
    test = create_dataset(prepared.sets["test"], final_eval, agg)
    t0 = time.perf_counter()
    fit(model, train, val, train_cfg, n_classes)
    y, p = predict_probs(model, test, 64, "cpu", "fp32", train_cfg.channels_last, train_cfg.tta)
    return {"test_auc": compute_auc(y, p), "test_acc": float((p.argmax(1) == y).mean()),
            "seconds": round(time.perf_counter() - t0, 1)}


def summarise(rows: list[dict], out: Path) -> None:
    """results.md (mean ± std per cell) and learning_curve.png (mean with a 95% CI band over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["strategy"], r["n_per_class"]), []).append(r)
    ns = sorted({r["n_per_class"] for r in rows}, key=lambda n: (n == "all", int(n) if n != "all" else 0))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    lines = ["| strategy | " + " | ".join(f"{n}/class" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in strategies:
        cols, xs, means, halfs = [], [], [], []
        for k, n in enumerate(ns):
            rs = cells.get((s, n), [])
            aucs = np.array([float(r["test_auc"]) for r in rs if r["test_auc"] not in ("", "None")])
            accs = np.array([float(r["test_acc"]) for r in rs])
            if not len(aucs):
                cols.append("—")
                continue
            cols.append(f"AUC {aucs.mean():.3f} ± {aucs.std():.3f}, acc {accs.mean():.3f} ± {accs.std():.3f} "
                        f"(n={len(aucs)})")
            xs.append(k)
            means.append(aucs.mean())
            halfs.append(1.96 * aucs.std(ddof=1) / np.sqrt(len(aucs)) if len(aucs) > 1 else 0.0)
        lines.append(f"| {s} | " + " | ".join(cols) + " |")
        means, halfs = np.array(means), np.array(halfs)
        ax.plot(xs, means, "o-", label=s)
        ax.fill_between(xs, means - halfs, means + halfs, alpha=0.2)
    ax.set_xticks(range(len(ns)), ns)
    ax.set(xlabel="labelled training examples per class", ylabel="test AUC", title="Label efficiency")
    save_study(fig, ax, out / "learning_curve.png", lines, out / "results.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-per-class", default="5,10,25,50,100,all")
    p.add_argument("--strategies", default="scratch,linear_probe,partial,full,auto")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--config", help="experiment YAML for everything else (epochs, learning rates, ...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    cfg = load_config(args.config, data={"path": args.data}, encoder={"input_size": args.input_size})
    strategies = args.strategies.split(",")
    for s in strategies:
        if s != "scratch":
            load_config(train={"strategy": s})  # unknown names fail here, with "did you mean"
    ns = args.n_per_class.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done = read_done(results)

    manifest = read_data(cfg.data)
    probe = create_encoder(cfg.encoder.name, pretrained=False, num_classes=len(manifest.class_names))
    pre = resolve_preprocessing(probe, cfg.encoder.input_size)
    prepared = prepare_data(cfg.data, pre, 0, manifest)
    labels = [s["label"] for s in prepared.sets["train"]]
    todo = [(s, n, seed) for n in ns for s in strategies for seed in seeds if (s, n, seed) not in done]
    print(f"{len(done)} cells done, {len(todo)} to run ({len(strategies)} strategies x {len(ns)} label counts x "
          f"{len(seeds)} seeds)", flush=True)
    t_start = time.perf_counter()
    new_file = not results.is_file()
    with open(results, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for k, (strategy, n, seed) in enumerate(todo, 1):
            idx = subsample(labels, None if n == "all" else int(n), seed)
            row = {"strategy": strategy, "n_per_class": n, "seed": seed,
                   **run_cell(cfg, prepared, pre, len(manifest.class_names), strategy, idx, seed)}
            writer.writerow(row)
            f.flush()
            elapsed = time.perf_counter() - t_start
            eta = elapsed / k * (len(todo) - k)
            auc = "n/a" if row["test_auc"] is None else f"{row['test_auc']:.3f}"
            print(f"[{k}/{len(todo)}] {strategy:12s} n={n:>4s} seed={seed}: test AUC {auc}, acc "
                  f"{row['test_acc']:.3f}, {row['seconds']:.0f}s; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
                  flush=True)
    with open(results) as f:
        rows = list(csv.DictReader(f))
    summarise(rows, args.out)
    print(f"written: {results}, {args.out / 'results.md'}, {args.out / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
