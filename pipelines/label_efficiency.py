"""How many labels does transfer learning save? Train with N labels per class, per strategy and seed.

    python pipelines/label_efficiency.py --data DATA --out DIR [--n-per-class 5,10,25,50,100,all]
        [--strategies scratch,linear_probe,partial,full,auto] [--seeds 0,1,2] [--input-size 64]
        [--config exp.yaml] [--volume-mode 2.5d] [--encoder-3d resnet10_3d_gn --input-size-3d 28]

DATA is a manifest CSV, an image folder or a MedMNIST .npz. A strategy named ``NAME+soupK`` trains K seeds of
NAME and combines them in a greedy weight-space soup (``train.ensemble``); ``NAME+semi`` adds the rest of the
training split, labels hidden, as the unlabelled pool of semi-supervised training (``data.unlabelled``). The
validation and test splits stay fixed; the N training examples per class are drawn with the seed (the same draw
for every strategy). "scratch" is the 2D encoder trained from random initialisation (every layer at the
head's learning rate, BatchNorm statistics learnt); "scratch_3d" is a MONAI 3D ResNet (GroupNorm by default) trained
from scratch on whole volumes (3D data only). A label count that a class cannot fill is reported with
the counts and skipped. Writes DIR/results.csv (one row per cell and seed, appended as soon as a
cell finishes, so an interrupted study resumes where it stopped), DIR/results.md (mean ± std per
cell) and DIR/learning_curve.png (test AUC vs labels per class, one line per strategy, 95% CI
bands over seeds).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

from medtl.cli import report_errors
from medtl.config import ExperimentConfig, load_config
from medtl.data import TooFewExamplesError, sample_per_class
from medtl.errors import TrainingDivergedError
from medtl.eval import compute_auc
from medtl.eval.figures import save_study
from medtl.metrics import seed_mean_ci
from medtl.models import Preprocessing, create_model
from medtl.predict.forward import predict_probs
from medtl.train import PreparedData, create_datasets, from_scratch, prepare_data, read_data, train_model

FIELDS = ["strategy", "n_per_class", "seed", "test_auc", "test_acc", "seconds"]
log = logging.getLogger("medtl.pipelines")


def read_done(path: Path) -> set[tuple[str, str, int]]:
    if not path.is_file():
        return set()
    with open(path) as f:
        return {(r["strategy"], r["n_per_class"], int(r["seed"])) for r in csv.DictReader(f)}


def cell_config(
    cfg: ExperimentConfig, strategy: str, seed: int, encoder_3d: str, size_3d: int, lr_3d: float | None = None
) -> ExperimentConfig:
    """The experiment of one study cell: the strategy's encoder, weights, input and training settings."""
    train = dataclasses.replace(cfg.train, seed=seed)
    if strategy == "scratch_3d":
        return dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, volume_mode="3d"),
            train=from_scratch(dataclasses.replace(train, lr=lr_3d or train.lr)),
            encoder=dataclasses.replace(cfg.encoder, name=encoder_3d, pretrained=False, input_size=size_3d),
        )
    if strategy == "scratch":
        return dataclasses.replace(
            cfg, train=from_scratch(train), encoder=dataclasses.replace(cfg.encoder, pretrained=False)
        )
    strategy = strategy.replace("+semi", "")  # (run_cell adds the unlabelled images)
    strategy, _, soup = strategy.partition("+soup")  # "full+soup3": 3 seeds of full fine-tuning in a greedy soup
    return dataclasses.replace(cfg, train=dataclasses.replace(train, strategy=strategy, ensemble=int(soup or 1)))


def run_cell(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    pre: Preprocessing,
    n_classes: int,
    train_idx: list[int],
    semi: bool = False,
) -> dict:
    """Train one cell's model on ``train_idx`` of the training split; its test AUC and accuracy. With ``semi``, the
    rest of the training split, labels hidden, is the unlabelled pool of semi-supervised training."""
    train = [prepared.sets["train"][i] for i in train_idx]
    unlabelled = None
    if semi:
        chosen = set(train_idx)
        rest = [{**s, "label": 0} for i, s in enumerate(prepared.sets["train"]) if i not in chosen]
        (unlabelled,) = create_datasets(cfg.data, pre, rest)
    t0 = time.perf_counter()
    model, result = train_model(cfg, train, prepared.sets["val"], n_classes, unlabelled=unlabelled)
    (test,) = create_datasets(cfg.data, pre, prepared.sets["test"])
    y, p = predict_probs(model, test, result.eval_runtime(), 64)
    return {
        "test_auc": compute_auc(y, p),
        "test_acc": float((p.argmax(1) == y).mean()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summarise(rows: list[dict], out: Path) -> None:
    """results.md (mean ± std per cell) and learning_curve.png (mean with a 95% CI band over seeds)."""
    import matplotlib  # (heavy: imported only when the figure is drawn)

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
            cols.append(
                f"AUC {aucs.mean():.3f} ± {aucs.std():.3f}, acc {accs.mean():.3f} ± {accs.std():.3f} (n={len(aucs)})"
            )
            mean, half = seed_mean_ci(aucs)
            xs.append(k)
            means.append(mean)
            halfs.append(half)
        lines.append(f"| {s} | " + " | ".join(cols) + " |")
        means, halfs = np.array(means), np.array(halfs)
        ax.plot(xs, means, "o-", label=s)
        ax.fill_between(xs, means - halfs, means + halfs, alpha=0.2)
    ax.set_xticks(range(len(ns)), ns)
    ax.set(xlabel="labelled training examples per class", ylabel="test AUC", title="Label efficiency")
    save_study(fig, ax, out / "learning_curve.png", lines, out / "results.md")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-per-class", default="5,10,25,50,100,all")
    p.add_argument("--strategies", default="scratch,linear_probe,partial,full,auto")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--volume-mode", help="3D data into 2D encoders (data.volume_mode: 2.5d, mip, slices, ...)")
    p.add_argument("--encoder-3d", default="resnet10_3d_gn", help="3D network of the scratch_3d strategy")
    p.add_argument("--input-size-3d", type=int, default=28, help="volume side of the scratch_3d strategy")
    p.add_argument("--lr-3d", type=float, default=1e-3, help="peak learning rate of the scratch_3d strategy")
    p.add_argument("--config", help="experiment YAML for everything else (epochs, learning rates, ...)")
    return p.parse_args(argv)


def check_strategies(strategies: list[str]) -> None:
    """Unknown strategy names fail here, before anything is trained."""
    for s in strategies:
        if s not in ("scratch", "scratch_3d"):
            name, _, soup = s.replace("+semi", "").partition("+soup")
            load_config(train={"strategy": name, "ensemble": int(soup or 1)})


class StudyData:
    """The data set decoded once per input kind ("2d", or "3d" for scratch_3d), with its preprocessing."""

    def __init__(self, cfg: ExperimentConfig):
        self.manifest = read_data(cfg.data)
        self.n_classes = len(self.manifest.class_names)
        self.prepared: dict[str, tuple[PreparedData, Preprocessing]] = {}

    def __call__(self, cell: ExperimentConfig) -> tuple[PreparedData, Preprocessing]:
        key = "3d" if cell.data.volume_mode == "3d" else "2d"
        if key not in self.prepared:
            _, pre = create_model(cell.encoder, self.n_classes, pretrained=False)  # (its preprocessing record)
            self.prepared[key] = (prepare_data(cell.data, pre, 0, self.manifest), pre)
        return self.prepared[key]


def plan_cells(
    args: argparse.Namespace,
    strategies: list[str],
    labels: list[int],
    class_names: list[str],
    done: set[tuple[str, str, int]],
) -> list[tuple[str, str, int, list[int]]]:
    """(strategy, label count, seed, training indices) of every cell not done yet; a label count that a class
    cannot fill is reported and skipped."""
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = []
    for n in args.n_per_class.split(","):
        try:
            draws = {
                seed: sample_per_class(labels, None if n == "all" else int(n), seed, class_names) for seed in seeds
            }
        except TooFewExamplesError as e:
            print(f"skipped n={n} per class: {e.problem}", flush=True)
            continue
        todo += [(s, n, seed, draws[seed]) for s in strategies for seed in seeds if (s, n, seed) not in done]
    return todo


def run_cells(args: argparse.Namespace, cfg: ExperimentConfig, data: StudyData, todo: list, results: Path) -> int:
    """Train and test every cell of ``todo``, each row appended to ``results`` as it finishes; the number of
    cells whose training diverged (reported, not written: a rerun resumes them)."""
    t_start = time.perf_counter()
    failed = 0
    new_file = not results.is_file()
    with open(results, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for k, (strategy, n, seed, idx) in enumerate(todo, 1):
            cell = cell_config(cfg, strategy, seed, args.encoder_3d, args.input_size_3d, args.lr_3d)
            prepared, pre = data(cell)
            try:
                row = {
                    "strategy": strategy,
                    "n_per_class": n,
                    "seed": seed,
                    **run_cell(cell, prepared, pre, data.n_classes, idx, semi="+semi" in strategy),
                }
            except TrainingDivergedError as e:
                failed += 1
                print(f"[{k}/{len(todo)}] {strategy:12s} n={n:>4s} seed={seed}: failed, {e}", flush=True)
                continue
            writer.writerow(row)
            f.flush()
            elapsed = time.perf_counter() - t_start
            eta = elapsed / k * (len(todo) - k)
            auc = "n/a" if row["test_auc"] is None else f"{row['test_auc']:.3f}"
            print(
                f"[{k}/{len(todo)}] {strategy:12s} n={n:>4s} seed={seed}: test AUC {auc}, acc "
                f"{row['test_acc']:.3f}, {row['seconds']:.0f}s; elapsed {elapsed / 60:.1f} min, "
                f"ETA {eta / 60:.1f} min",
                flush=True,
            )
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    data_section = {"path": args.data, **({"volume_mode": args.volume_mode} if args.volume_mode else {})}
    cfg = load_config(args.config, data=data_section, encoder={"input_size": args.input_size})
    strategies = args.strategies.split(",")
    check_strategies(strategies)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done = read_done(results)
    data = StudyData(cfg)
    first = cell_config(cfg, strategies[0], 0, args.encoder_3d, args.input_size_3d, args.lr_3d)
    labels = [s["label"] for s in data(first)[0].sets["train"]]
    todo = plan_cells(args, strategies, labels, data.manifest.class_names, done)
    print(
        f"{len(done)} cells done, {len(todo)} to run ({len(strategies)} strategies x "
        f"{len(args.n_per_class.split(','))} label counts x {len(args.seeds.split(','))} seeds)",
        flush=True,
    )
    failed = run_cells(args, cfg, data, todo, results)
    if not results.is_file() or not read_done(results):
        print("no cell could run", file=sys.stderr)
        return 1
    with open(results) as f:
        rows = list(csv.DictReader(f))
    summarise(rows, args.out)
    print(f"written: {results}, {args.out / 'results.md'}, {args.out / 'learning_curve.png'}")
    if failed:
        print(f"{failed} cells failed (see above); they are not in the results and rerun on resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(report_errors(main))
