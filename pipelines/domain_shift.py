"""How well does a pretrained model adapt when the data shifts (a new scanner, a new site)?

    python pipelines/domain_shift.py --data DATA --out DIR [--shift all] [--k 0,5,10,25,50]
        [--seeds 0,1,2] [--input-size 64] [--config exp.yaml] [--site-column site --source-site A]

Trains on the source distribution, tests on a shifted target, then adapts with k labelled target
examples per class, either by fine-tuning the source model or by training from the ImageNet
weights on the k target examples alone ("retrain"). The target is either:
  - a realistic acquisition change made with MONAI transforms and applied deterministically (one
    fixed seed) to copies of the splits: bias field, gamma contrast, blur, noise, lower resolution,
    or "all" of them together; or
  - real sites: with --site-column, images of --source-site are the source, the others the target.
Writes DIR/results.csv (shift, k_per_class, method, seed, target_auc, target_acc, source_auc,
seconds; resumable), DIR/results.md and DIR/adaptation.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from monai.transforms import Compose, GaussianSmooth, RandAdjustContrast, RandBiasField, RandGaussianNoise, Resize
from safetensors.torch import load_file, save_file

from medtl.adapt.batchnorm import adapt, bn_statistics
from medtl.cli import report_errors
from medtl.config import ExperimentConfig, load_config
from medtl.data import TooFewExamplesError, iterate_batches, sample_per_class
from medtl.eval import compute_auc
from medtl.eval.figures import save_study
from medtl.metrics import seed_mean_ci
from medtl.models import Preprocessing, create_model
from medtl.predict.forward import predict_probs
from medtl.runtime import Runtime, inference_precision, resolve_device
from medtl.train import create_datasets, create_seeded_model, prepare_data, read_data, train_model

FIELDS = ["shift", "k_per_class", "method", "seed", "target_auc", "target_acc", "source_auc", "seconds"]
SHIFTS = ("bias_field", "gamma", "blur", "noise", "resolution", "all")


class LowerResolution:
    """Down-sample by ``factor`` and back: the detail a coarser acquisition would not have."""

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def __call__(self, x):
        size = x.shape[1:]
        small = Resize([max(4, int(s * self.factor)) for s in size], mode="area")(x)
        return Resize(size, mode="bilinear")(small)


def create_shift(name: str, seed: int = 1234) -> Compose:
    """A deterministic MONAI acquisition shift on (C, H, W) images in [0, 1]."""
    parts = {
        "bias_field": RandBiasField(prob=1.0, coeff_range=(0.3, 0.4), degree=3),
        "gamma": RandAdjustContrast(prob=1.0, gamma=(1.8, 1.8)),
        "blur": GaussianSmooth(sigma=1.2),
        "noise": RandGaussianNoise(prob=1.0, std=0.08),
        "resolution": LowerResolution(0.5),
    }
    chain = list(parts.values()) if name == "all" else [parts[name]]
    t = Compose(chain)
    t.set_random_state(seed=seed)
    return t


def shifted(studies: list[dict], shift: Compose) -> list[dict]:
    out = []
    for s in studies:
        image = np.clip(np.asarray(shift(np.asarray(s["image"], np.float32))), 0, 1).astype(np.float32)
        out.append({**s, "image": image})
    return out


ZERO_LABEL = ("source_only", "adabn", "adabn_plain", "tent", "self_train", "semi", "adabn+semi")


def parse_method(method: str) -> tuple[bool, str, bool]:
    """(AdaBN first, the strategy or method, semi-supervised on the unlabelled target) of a method name such as
    ``adabn+lp_ft+semi``."""
    adabn = method.startswith("adabn+")
    name = method.removeprefix("adabn+")
    semi = name.endswith("+semi") or name == "semi"
    return adabn, name.removesuffix("+semi"), semi


def confident(probs: np.ndarray, fraction: float) -> list[int]:
    """The indices of the most confident ``fraction`` of the images predicted as each class (at least one
    per class predicted), so every class keeps pseudo-labels however skewed the predictions are."""
    pred, conf = probs.argmax(1), probs.max(1)
    keep = []
    for c in np.unique(pred):
        idx = np.flatnonzero(pred == c)
        keep += idx[np.argsort(-conf[idx])][: max(1, round(fraction * len(idx)))].tolist()
    return sorted(keep)


def _images(dataset, runtime, shuffle: bool = False, seed: int = 0, batch_size: int = 64):
    """The model inputs of a data set, in batches (shuffled with ``shuffle``); its labels are not read."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else None
    for batch in iterate_batches(dataset, batch_size, runtime.device, order=order):
        yield batch["image"]


def evaluate(
    model, studies: list[dict], cfg: ExperimentConfig, pre: Preprocessing, runtime: Runtime
) -> tuple[float | None, float]:
    """Test AUC and accuracy of ``model`` on ``studies``."""
    (dataset,) = create_datasets(cfg.data, pre, studies)
    y, p = predict_probs(model, dataset, runtime, 64)
    return compute_auc(y, p), float((p.argmax(1) == y).mean())


class Source(NamedTuple):  # (not a dataclass: the tests import this script without registering it in sys.modules)
    """One seed's source model and what the adaptations need of it."""

    cfg: ExperimentConfig  # the experiment, with train.seed the seed
    studies: dict[str, list[dict]]  # the source splits
    pre: Preprocessing
    model: torch.nn.Module
    runtime: Runtime
    stats: dict  # its BatchNorm statistics on the source training images
    auc: float | None  # its test AUC on the (unshifted) source


def source_model(
    cfg: ExperimentConfig, studies: dict[str, list[dict]], pre: Preprocessing, n_classes: int, cached: Path
) -> Source:
    """The seed's source model: trained on the source splits, or loaded from ``cached`` (saved when trained, so
    methods added later reuse it); its test AUC and BatchNorm statistics on the source."""
    if cached.is_file():
        model, _ = create_seeded_model(cfg, n_classes)
        model.load_state_dict(load_file(str(cached)))
        runtime = Runtime(resolve_device(cfg.train.device), inference_precision(None))
        runtime.prepare(model)
    else:
        model, result = train_model(cfg, studies["train"], studies["val"], n_classes)
        runtime = result.eval_runtime()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(cached))
    auc, _ = evaluate(model, studies["test"], cfg, pre, runtime)
    (train_eval,) = create_datasets(cfg.data, pre, studies["train"])
    stats = bn_statistics(model, _images(train_eval, runtime), runtime)
    return Source(cfg, studies, pre, model, runtime, stats, auc)


def zero_label_model(
    src: Source, method: str, target: dict[str, list[dict]], unlabelled, batches, n_classes: int, pseudo_fraction: float
) -> torch.nn.Module:
    """A zero-label method: the source model itself, AdaBN or TENT on the target, self-training on confident
    pseudo-labels, or FixMatch consistency on the unlabelled target (``semi``, ``adabn+semi``)."""
    first_adabn, strategy, _ = parse_method(method)
    if strategy == "semi":  # zero labels: the source labels, with consistency on the unlabelled target
        model = adapt(src.model, "adabn", batches, src.stats, src.runtime) if first_adabn else copy.deepcopy(src.model)
        tc = dataclasses.replace(src.cfg.train, strategy="full", frozen_epochs=0, epochs=min(src.cfg.train.epochs, 5))
        train_model(
            dataclasses.replace(src.cfg, train=tc),
            src.studies["train"],
            src.studies["val"],
            n_classes,
            model=model,
            unlabelled=unlabelled,
        )  # (5 epochs: each sweeps the whole unlabelled target once)
        return model
    if method == "self_train":  # source-matched AdaBN, then fine-tuning on confident pseudo-labels
        model = adapt(src.model, "adabn", batches, src.stats, src.runtime)
        _, probs = predict_probs(model, unlabelled, src.runtime, 64)
        pseudo = [{**target["train"][i], "label": int(probs[i].argmax())} for i in confident(probs, pseudo_fraction)]
        train_model(src.cfg, pseudo, src.studies["val"], n_classes, model=model)
        return model
    return src.model if method == "source_only" else adapt(src.model, method, batches, src.stats, src.runtime)


def few_label_model(
    src: Source, method: str, few: list[dict], target: dict[str, list[dict]], unlabelled, batches, n_classes: int
) -> torch.nn.Module:
    """A method with k target labels per class: fine-tuning the source model (after AdaBN with ``adabn+``, with
    any train.strategy), or training from the ImageNet weights on them alone (``retrain``)."""
    first_adabn, strategy, semi = parse_method(method)
    cell = (
        src.cfg
        if strategy in ("retrain", "fine_tune")
        else dataclasses.replace(src.cfg, train=dataclasses.replace(src.cfg.train, strategy=strategy))
    )
    if strategy == "retrain":
        model = None  # (train_model builds it, seeded with the seed)
    elif first_adabn:
        model = adapt(src.model, "adabn", batches, src.stats, src.runtime)
    else:
        model = copy.deepcopy(src.model)
    model, _ = train_model(cell, few, target["val"], n_classes, model=model, unlabelled=unlabelled if semi else None)
    return model


def run_method(
    src: Source,
    shift: str,
    k: int,
    method: str,
    target: dict[str, list[dict]],
    n_classes: int,
    pseudo_fraction: float,
    seconds_before: float = 0.0,
) -> dict | None:
    """One row of results.csv: ``method`` with ``k`` target labels per class (None where a class has fewer);
    ``seconds_before`` is added to its time."""
    seed = src.cfg.train.seed
    t1 = time.perf_counter()
    (unlabelled,) = create_datasets(src.cfg.data, src.pre, target["train"])  # labels never read

    def batches(ds=unlabelled):  # shuffled (the same order each call)
        return _images(ds, src.runtime, True, seed)

    if k == 0:
        model = zero_label_model(src, method, target, unlabelled, batches, n_classes, pseudo_fraction)
    else:
        try:
            few = [target["train"][i] for i in sample_per_class([s["label"] for s in target["train"]], k, seed)]
        except TooFewExamplesError as e:
            print(f"skipped k={k} per class: {e.problem}", flush=True)
            return None
        model = few_label_model(src, method, few, target, unlabelled, batches, n_classes)
    auc, acc = evaluate(model, target["test"], src.cfg, src.pre, src.runtime)
    return {
        "shift": shift,
        "k_per_class": k,
        "method": method,
        "seed": seed,
        "target_auc": auc,
        "target_acc": acc,
        "source_auc": src.auc,
        "seconds": round(time.perf_counter() - t1 + seconds_before, 1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--shift",
        default="all",
        help="comma-separated, of " + ", ".join(SHIFTS) + " (ignored with "
        "--site-column); the source model of a seed is trained once for all of them",
    )
    p.add_argument(
        "--methods",
        default="source_only,adabn,adabn_plain,tent,fine_tune,adabn+fine_tune,retrain",
        help="k=0: source_only and the zero-label adaptations (adabn: source-matched, adabn_plain, "
        "tent, self_train: AdaBN then fine-tuning on confident pseudo-labels, validated on the source; "
        "semi / adabn+semi: the source labels with FixMatch consistency on the unlabelled target images); "
        "k>0: fine_tune, adabn+fine_tune (source-matched AdaBN on the unlabelled target training images, "
        "then fine-tuning on the k labels), any train.strategy in their place (adabn+lp_ft, lora, ...), "
        "a +semi suffix for consistency on the unlabelled target images, retrain",
    )
    p.add_argument("--k", default="0,5,10,25,50", help="target labels per class for adaptation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument(
        "--pseudo-fraction",
        type=float,
        default=0.5,
        help="self_train: the most confident fraction of each predicted class kept as pseudo-labels",
    )
    p.add_argument("--config")
    p.add_argument("--site-column", help="manifest column naming the site (real shift)")
    p.add_argument("--source-site", help="the site used as source (with --site-column)")
    return p.parse_args(argv)


def source_and_targets(args: argparse.Namespace, sets: dict[str, list[dict]]) -> tuple[dict, dict]:
    """The source splits, and the target splits of each shift: the other sites' images (--site-column), or
    shifted copies of every split."""
    if args.site_column:

        def by_site(part, source):
            return [s for s in part if (str(s.get(args.site_column)) == args.source_site) == source]

        source = {n: by_site(part, True) for n, part in sets.items()}
        target = {n: by_site(part, False) for n, part in sets.items()}
        return source, {f"{args.site_column}!={args.source_site}": target}
    return sets, {
        name: {n: shifted(part, create_shift(name)) for n, part in sets.items()} for name in args.shift.split(",")
    }


def read_done(results: Path) -> set[tuple[str, str, str, str]]:
    if not results.is_file():
        return set()
    with open(results) as f:
        return {(r["shift"], r["k_per_class"], r["method"], r["seed"]) for r in csv.DictReader(f)}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = load_config(args.config, data={"path": args.data}, encoder={"input_size": args.input_size})
    manifest = read_data(cfg.data)
    n_classes = len(manifest.class_names)
    _, pre = create_model(cfg.encoder, n_classes, pretrained=False)  # (its preprocessing record)
    source, targets = source_and_targets(args, prepare_data(cfg.data, pre, 0, manifest).sets)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done = read_done(results)
    ks, methods = [int(k) for k in args.k.split(",")], args.methods.split(",")
    new_file = not results.is_file()
    with open(results, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for seed in [int(s) for s in args.seeds.split(",")]:
            todo = [
                (name, k, m)
                for name in targets
                for k in ks
                for m in methods
                if (k == 0) == (m in ZERO_LABEL) and (name, str(k), m, str(seed)) not in done
            ]
            if not todo:
                continue
            t0 = time.perf_counter()
            seed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            src = source_model(seed_cfg, source, pre, n_classes, args.out / f"source_model_seed{seed}.safetensors")
            base_seconds = time.perf_counter() - t0
            for shift_name, k, method in todo:
                before = base_seconds if method == "source_only" else 0.0  # (its time includes the source model's)
                row = run_method(
                    src, shift_name, k, method, targets[shift_name], n_classes, args.pseudo_fraction, before
                )
                if row is None:
                    continue
                writer.writerow(row)
                f.flush()
                auc = row["target_auc"]
                print(
                    f"{shift_name} k={k:>3d} {method:16s} seed={seed}: target AUC "
                    f"{'n/a' if auc is None else f'{auc:.3f}'} (source test AUC {src.auc:.3f})",
                    flush=True,
                )
    with open(results) as f:
        summarise(list(csv.DictReader(f)), args.out)
    return 0


def summarise(rows: list[dict], out: Path) -> None:
    """results.md (mean ± std of the target AUC per shift, method and k) and adaptation.png."""
    import matplotlib  # (heavy: imported only when the figure is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(r["k_per_class"]) for r in rows})
    lines = ["| shift | method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    # the table's and the legend's order: the zero-label methods, fine-tuning, any other, retraining last
    methods = list(
        dict.fromkeys((*ZERO_LABEL, "fine_tune", "adabn+fine_tune", *(r["method"] for r in rows), "retrain"))
    )
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for shift in sorted({r["shift"] for r in rows}):
        lines += summarise_shift(ax, rows, shift, ks, methods)
    ax.set(
        xlabel="labelled target examples per class",
        ylabel="target test AUC (95% CI over seeds)",
        title="Adaptation to a shift",
    )
    save_study(fig, ax, out / "adaptation.png", lines, out / "results.md")


def summarise_shift(ax, rows: list[dict], shift: str, ks: list[int], methods: list[str]) -> list[str]:
    """results.md's lines of one ``shift`` (the source model on the unshifted test, then each of ``methods`` with
    results), each also drawn on ``ax``."""
    lines = []
    src = [float(r["source_auc"]) for r in rows if r["shift"] == shift and r["method"] == "source_only"]
    if src:
        ax.axhline(np.mean(src), ls=":", color="grey", label=f"source model on unshifted test ({shift})")
        lines.append(
            f"| {shift} | source model, unshifted test | {np.mean(src):.3f} ± {np.std(src):.3f} |"
            + " — |" * (len(ks) - 1)
        )
    for method in methods:
        cells, xs, means, halfs = method_results(rows, shift, method, ks)
        if not xs:
            continue
        lines.append(f"| {shift} | {method} | " + " | ".join(cells) + " |")
        draw_method(ax, method, shift, xs, means, halfs)
    return lines


def method_results(
    rows: list[dict], shift: str, method: str, ks: list[int]
) -> tuple[list[str], list[int], list[float], list[float]]:
    """The target AUCs of ``method`` on ``shift``: a table cell per k (mean ± std over seeds, "—" where none),
    and the ks that have results with their mean and 95% CI half-width over seeds."""
    cells, xs, means, halfs = [], [], [], []
    for k in ks:
        v = np.array(
            [
                float(r["target_auc"])
                for r in rows
                if r["shift"] == shift
                and r["method"] == method
                and int(r["k_per_class"]) == k
                and r["target_auc"] not in ("", "None")
            ]
        )
        cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "—")
        if len(v):
            mean, half = seed_mean_ci(v)
            xs.append(k)
            means.append(mean)
            halfs.append(half)
    return cells, xs, means, halfs


def draw_method(ax, method: str, shift: str, xs: list[int], means: list[float], halfs: list[float]) -> None:
    """Draw ``method``'s results on ``shift``: a level to beat for a method without target labels (its first
    mean), else its curve over k with the 95% CI band."""
    if method in ZERO_LABEL:  # no target labels: a level to beat, not a curve
        ax.axhline(
            means[0],
            ls="--",
            color="black" if method == "source_only" else None,
            label=f"{method} on shifted test ({shift})",
        )
        return
    mean, half = np.array(means), np.array(halfs)
    ax.plot(xs, mean, "o-", label=f"{method} ({shift})")
    ax.fill_between(xs, mean - half, mean + half, alpha=0.2)


if __name__ == "__main__":
    sys.exit(report_errors(main))
