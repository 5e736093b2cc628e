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

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from monai.transforms import Compose, GaussianSmooth, RandAdjustContrast, RandBiasField, RandGaussianNoise, Resize

from medtl.adapt import adapt, bn_statistics
from medtl.cli import report_errors
from medtl.config import load_config
from medtl.data import TooFewExamplesError, create_dataset, iterate_batches, sample_per_class, store_options
from medtl.eval import compute_auc
from medtl.eval.report import save_study, seed_mean_ci
from medtl.models import create_model
from medtl.predict import predict_probs
from medtl.runtime import Runtime, inference_precision, resolve_device
from medtl.train import fit, prepare_data, read_data
from medtl.transforms import create_transforms

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
        keep += idx[np.argsort(-conf[idx])][: max(1, int(round(fraction * len(idx))))].tolist()
    return sorted(keep)


def _images(dataset, runtime, shuffle: bool = False, seed: int = 0, batch_size: int = 64):
    """The model inputs of a data set, in batches (shuffled with ``shuffle``); its labels are not read."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else None
    for batch in iterate_batches(dataset, batch_size, runtime.device, order=order):
        yield batch["image"]


def evaluate(model, studies, final, agg, runtime, store: dict | None = None) -> tuple[float | None, float]:
    y, p = predict_probs(model, create_dataset(studies, final, agg, **(store or {})), runtime, 64)
    return compute_auc(y, p), float((p.argmax(1) == y).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shift", default="all", help="comma-separated, of " + ", ".join(SHIFTS) + " (ignored with "
                   "--site-column); the source model of a seed is trained once for all of them")
    p.add_argument("--methods", default="source_only,adabn,adabn_plain,tent,fine_tune,adabn+fine_tune,retrain",
                   help="k=0: source_only and the zero-label adaptations (adabn: source-matched, adabn_plain, "
                   "tent, self_train: AdaBN then fine-tuning on confident pseudo-labels, validated on the source; "
                   "semi / adabn+semi: the source labels with FixMatch consistency on the unlabelled target images); "
                   "k>0: fine_tune, adabn+fine_tune (source-matched AdaBN on the unlabelled target training images, "
                   "then fine-tuning on the k labels), any train.strategy in their place (adabn+lp_ft, lora, ...), "
                   "a +semi suffix for consistency on the unlabelled target images, retrain")
    p.add_argument("--k", default="0,5,10,25,50", help="target labels per class for adaptation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--pseudo-fraction", type=float, default=0.5, help="self_train: the most confident fraction of "
                   "each predicted class kept as pseudo-labels")
    p.add_argument("--config")
    p.add_argument("--site-column", help="manifest column naming the site (real shift)")
    p.add_argument("--source-site", help="the site used as source (with --site-column)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = load_config(args.config, data={"path": args.data}, encoder={"input_size": args.input_size})
    manifest = read_data(cfg.data)
    n_classes = len(manifest.class_names)
    _, pre = create_model(cfg.encoder, n_classes, pretrained=False)
    prepared = prepare_data(cfg.data, pre, 0, manifest)
    if args.site_column:
        def by_site(part, source):
            return [s for s in part if (str(s.get(args.site_column)) == args.source_site) == source]
        source = {n: by_site(part, True) for n, part in prepared.sets.items()}
        targets = {f"{args.site_column}!={args.source_site}": {n: by_site(part, False)
                                                               for n, part in prepared.sets.items()}}
    else:
        source = prepared.sets
        targets = {name: {n: shifted(part, create_shift(name)) for n, part in prepared.sets.items()}
                   for name in args.shift.split(",")}
    _, final_train = create_transforms(cfg.data, pre, train=True)
    _, final_eval = create_transforms(cfg.data, pre, train=False)
    agg, store = (cfg.data.slice_aggregation, cfg.data.top_k), store_options(cfg.data)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done = set()
    if results.is_file():
        done = {(r["shift"], r["k_per_class"], r["method"], r["seed"]) for r in csv.DictReader(open(results))}
    ks = [int(k) for k in args.k.split(",")]
    methods = args.methods.split(",")
    new_file = not results.is_file()
    with open(results, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for seed in [int(s) for s in args.seeds.split(",")]:
            todo = [(name, k, m) for name in targets for k in ks for m in methods
                    if (k == 0) == (m in ZERO_LABEL) and (name, str(k), m, str(seed)) not in done]
            if not todo:
                continue
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            src_model, _ = create_model(cfg.encoder, n_classes)
            tc = dataclasses.replace(cfg.train, seed=seed)
            cached = args.out / f"source_model_seed{seed}.safetensors"  # methods added later reuse the model
            if cached.is_file():
                src_model.load_state_dict(load_file(str(cached)))
                runtime = Runtime(resolve_device(tc.device), inference_precision(None))
                runtime.prepare(src_model)
            else:
                runtime = fit(src_model, create_dataset(source["train"], final_train, agg, **store),
                              create_dataset(source["val"], final_eval, agg, **store), tc, n_classes).eval_runtime()
                save_file({k: v.detach().cpu().contiguous() for k, v in src_model.state_dict().items()}, str(cached))
            source_auc, _ = evaluate(src_model, source["test"], final_eval, agg, runtime, store)
            source_stats = bn_statistics(src_model, _images(create_dataset(source["train"], final_eval, agg, **store),
                                                             runtime), runtime)
            base_seconds = time.perf_counter() - t0
            for shift_name, k, method in todo:
                target = targets[shift_name]
                t1 = time.perf_counter()
                unlabelled = create_dataset(target["train"], final_eval, agg, **store)  # labels never read

                def batches(ds=unlabelled):  # shuffled (the same order each call)
                    return _images(ds, runtime, True, seed)

                first_adabn, strategy, semi = parse_method(method)
                pool = unlabelled if semi else None  # FixMatch consistency on the unlabelled target images
                if strategy == "semi":  # zero labels: the source labels, with consistency on the unlabelled target
                    model = adapt(src_model, "adabn", batches, source_stats, runtime) if first_adabn else \
                        copy.deepcopy(src_model)
                    fit(model, create_dataset(source["train"], final_train, agg, **store),
                        create_dataset(source["val"], final_eval, agg, **store),
                        dataclasses.replace(tc, strategy="full", frozen_epochs=0, epochs=min(tc.epochs, 5)), n_classes,
                        unlabelled_ds=pool)  # (5 epochs: each sweeps the whole unlabelled target once)
                elif method == "self_train":  # source-matched AdaBN, then fine-tuning on confident pseudo-labels
                    model = adapt(src_model, "adabn", batches, source_stats, runtime)
                    _, probs = predict_probs(model, unlabelled, runtime, 64)
                    pseudo = [{**target["train"][i], "label": int(probs[i].argmax())}
                              for i in confident(probs, args.pseudo_fraction)]
                    fit(model, create_dataset(pseudo, final_train, agg, **store),
                        create_dataset(source["val"], final_eval, agg, **store), tc, n_classes)
                elif k == 0:
                    model = src_model if method == "source_only" else \
                        adapt(src_model, method, batches, source_stats, runtime)
                else:
                    try:
                        few = [target["train"][i] for i in sample_per_class(
                            [s["label"] for s in target["train"]], k, seed)]
                    except TooFewExamplesError as e:
                        print(f"skipped k={k} per class: {e.problem}", flush=True)
                        continue
                    torch.manual_seed(seed)
                    if strategy == "retrain":
                        model = create_model(cfg.encoder, n_classes)[0]
                    elif first_adabn:
                        model = adapt(src_model, "adabn", batches, source_stats, runtime)
                    else:
                        model = copy.deepcopy(src_model)
                    fit(model, create_dataset(few, final_train, agg, **store),
                        create_dataset(target["val"], final_eval, agg, **store),
                        tc if strategy in ("retrain", "fine_tune") else dataclasses.replace(tc, strategy=strategy),
                        n_classes, unlabelled_ds=pool)
                auc, acc = evaluate(model, target["test"], final_eval, agg, runtime, store)
                row = {"shift": shift_name, "k_per_class": k, "method": method, "seed": seed, "target_auc": auc,
                       "target_acc": acc, "source_auc": source_auc,
                       "seconds": round(time.perf_counter() - t1 + (base_seconds if method == "source_only" else 0), 1)}
                writer.writerow(row)
                f.flush()
                print(f"{shift_name} k={k:>3d} {method:16s} seed={seed}: target AUC "
                      f"{'n/a' if auc is None else f'{auc:.3f}'} (source test AUC {source_auc:.3f})", flush=True)
    summarise(list(csv.DictReader(open(results))), args.out)
    return 0


def summarise(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(r["k_per_class"]) for r in rows})
    lines = ["| shift | method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for shift in sorted({r["shift"] for r in rows}):
        src = [float(r["source_auc"]) for r in rows if r["shift"] == shift and r["method"] == "source_only"]
        if src:
            ax.axhline(np.mean(src), ls=":", color="grey", label=f"source model on unshifted test ({shift})")
            lines.append(f"| {shift} | source model, unshifted test | {np.mean(src):.3f} ± {np.std(src):.3f} |"
                         + " — |" * (len(ks) - 1))
        for method in dict.fromkeys(("source_only", "adabn", "adabn_plain", "tent", "self_train", "semi", "adabn+semi",
                                     "fine_tune", "adabn+fine_tune", *(r["method"] for r in rows), "retrain")):
            cells, xs, means, halfs = [], [], [], []
            for k in ks:
                v = np.array([float(r["target_auc"]) for r in rows if r["shift"] == shift and r["method"] == method
                              and int(r["k_per_class"]) == k and r["target_auc"] not in ("", "None")])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "—")
                if len(v):
                    mean, half = seed_mean_ci(v)
                    xs.append(k)
                    means.append(mean)
                    halfs.append(half)
            if not xs:
                continue
            lines.append(f"| {shift} | {method} | " + " | ".join(cells) + " |")
            if method in ZERO_LABEL:  # no target labels: a level to beat, not a curve
                ax.axhline(means[0], ls="--", color="black" if method == "source_only" else None,
                           label=f"{method} on shifted test ({shift})")
                continue
            means, halfs = np.array(means), np.array(halfs)
            ax.plot(xs, means, "o-", label=f"{method} ({shift})")
            ax.fill_between(xs, means - halfs, means + halfs, alpha=0.2)
    ax.set(xlabel="labelled target examples per class", ylabel="target test AUC (95% CI over seeds)",
           title="Adaptation to a shift")
    save_study(fig, ax, out / "adaptation.png", lines, out / "results.md")


if __name__ == "__main__":
    sys.exit(report_errors(main))
