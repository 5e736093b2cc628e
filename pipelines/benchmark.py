"""medtl's speed figures, each measured against a baseline in the same run.

    python pipelines/benchmark.py [--json results.json] [--quick]

Sections (all on generated sample data, so the script runs anywhere):
  io        decode + preprocessing throughput: medtl's chain with and without its decoded-input
            cache vs a plain MONAI LoadImage + transforms pipeline (images/s for 2D DICOM files,
            slices/s for a 100-slice DICOM series)
  train     training throughput of medtl's loop vs a plain PyTorch/timm fp32 loop, same encoder,
            same input size, same data
  probe     head-only (linear-probe) training time with and without feature caching
  infer     prediction and Grad-CAM latency per image and per 100-slice volume
Peak memory (max RSS) is reported at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medtl.config import load_config
from medtl.data import create_sample_data, create_sample_series, read_dataset
from medtl.models import create_encoder, resolve_preprocessing
from medtl.train import fit, prepare_data
from medtl.transforms import create_transforms


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call: the best of ``repeat`` calls (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_io(work: Path, size: int) -> dict:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRange, SpatialPad

    manifest = work / "sample" / "manifest.csv"
    files = [r["image"] for r in read_dataset(manifest).records]
    data = load_config(data={"path": str(manifest), "augment": False}).data
    pre = resolve_preprocessing(create_encoder("efficientnet_lite0", pretrained=False), size)
    det, final = create_transforms(data, pre, train=False)
    records = [{"image": f, "label": 0} for f in files]
    cold = timed(lambda: [final(det(r)) for r in records], 3)
    cached = [det(r) for r in records]
    warm = timed(lambda: [final({"image": c["image"], "label": 0}) for c in cached], 3)
    plain = Compose([LoadImage(image_only=True, reader="PydicomReader"), EnsureChannelFirst(),
                     ScaleIntensityRange(-160, 240, 0, 1, clip=True), Resize(size, size_mode="longest"),
                     SpatialPad((size, size))])
    base = timed(lambda: [plain(f) for f in files], 3)
    n = len(files)
    out = {"io_2d_files": n, "io_2d_medtl_img_per_s": n / cold, "io_2d_medtl_cached_img_per_s": n / warm,
           "io_2d_plain_monai_img_per_s": n / base}

    from medtl.io import read_series

    series = work / "series"
    t_medtl = timed(lambda: read_series(series), 3)
    t_plain = timed(lambda: LoadImage(image_only=True, reader="PydicomReader")(str(series)), 3)
    out.update(io_series_slices=100, io_series_medtl_slices_per_s=100 / t_medtl,
               io_series_plain_monai_slices_per_s=100 / t_plain)
    return out


def _prepared(manifest: Path, size: int, augment: bool):
    cfg = load_config(data={"path": str(manifest), "augment": augment}, encoder={"input_size": size})
    model = create_encoder("efficientnet_lite0", num_classes=2)
    pre = resolve_preprocessing(model, size)
    prepared = prepare_data(cfg.data, pre, 0)
    return cfg, model, prepared.datasets(cfg.data, pre)


def plain_loop(train_ds, size: int, epochs: int, batch_size: int) -> float:
    """The loop a user writes first: timm model, NCHW, fp32, BatchNorm in train mode, AdamW."""
    from torch.utils.data import DataLoader

    model = create_encoder("efficientnet_lite0", num_classes=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True)
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if epoch == 1:  # the first epoch is a warm-up (allocator, oneDNN kernel choice): not timed
            n, t0 = 0, time.perf_counter()
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch["image"]), torch.as_tensor(batch["label"]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(batch["image"])
    return n / (time.perf_counter() - t0)


def bench_train(work: Path, size: int, epochs: int, batch_size: int) -> dict:
    manifest = work / "sample" / "manifest.csv"
    cfg, model, (train, val, _) = _prepared(manifest, size, augment=True)
    plain = plain_loop(train, size, epochs, batch_size)
    tc = cfg.train.__class__(**{**cfg.train.__dict__, "strategy": "full", "epochs": epochs, "batch_size": batch_size,
                                "patience": epochs + 1})
    result = fit(model, train, val, tc, num_classes=2)
    steps = len(train) // batch_size
    timed_epochs = result.history[1:]  # the first epoch is a warm-up, as in the plain loop
    medtl = len(timed_epochs) * steps * batch_size / sum(r["seconds"] for r in timed_epochs)
    return {"train_input_px": size, "train_batch_size": batch_size, "train_precision": result.precision,
            "train_timed_epochs": len(timed_epochs), "plain_train_img_per_s": plain, "train_img_per_s": medtl,
            "speedup": medtl / plain}


def bench_probe(work: Path, size: int, epochs: int) -> dict:
    manifest = work / "sample" / "manifest.csv"
    out = {"probe_epochs": epochs}
    for cache in (True, False):
        cfg, model, (train, val, _) = _prepared(manifest, size, augment=False)
        tc = cfg.train.__class__(**{**cfg.train.__dict__, "strategy": "linear_probe", "epochs": epochs,
                                    "cache_features": cache, "patience": epochs + 1})
        out[f"probe_seconds_{'cached' if cache else 'uncached'}"] = timed(
            lambda: fit(model, train, val, tc, num_classes=2))
    out["probe_speedup"] = out["probe_seconds_uncached"] / out["probe_seconds_cached"]
    return out


def bench_infer(work: Path, size: int) -> dict:
    from medtl.train import run_experiment

    manifest = work / "sample" / "manifest.csv"
    out = {}
    for mode in ("middle", "slices"):
        cfg = load_config(data={"path": str(manifest), "augment": False, "volume_mode": mode},
                          encoder={"input_size": size}, train={"epochs": 1, "frozen_epochs": 1},
                          explain={"n_overlays": 0})
        run = run_experiment(cfg, work / f"run_{mode}", force=True)
        from medtl.inference import load_run

        predictor = load_run(run)
        if mode == "middle":
            image = read_dataset(manifest).records[0]["image"]
            predictor.predict(image)
            out["infer_image_predict_ms"] = 1000 * timed(lambda: predictor.predict(image), 5)
            out["infer_image_explain_ms"] = 1000 * timed(lambda: predictor.explain(image), 5)
        else:
            series = work / "series"
            out["infer_volume100_predict_s"] = timed(lambda: predictor.predict(series))
            out["infer_volume100_explain_s"] = timed(lambda: predictor.explain(series))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--size", type=int, default=224, help="encoder input size in pixels (default 224)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per loop, the first untimed (default 4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sections", default="io,train,probe,infer", help="comma-separated subset to run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        create_sample_data(work / "sample", n_patients=48, n_volumes=0, force=True)
        create_sample_series(work / "series", n_slices=100)
        steps = {"io": lambda: bench_io(work, args.size),
                 "train": lambda: bench_train(work, args.size, args.epochs, args.batch_size),
                 "probe": lambda: bench_probe(work, args.size, 10),
                 "infer": lambda: bench_infer(work, args.size)}
        for name in sections:
            t0 = time.perf_counter()
            result = steps[name]()
            figures.update(result)
            for k, v in result.items():
                print(f"{k:36s} {v:10.2f}" if isinstance(v, float) else f"{k:36s} {v!s:>10}", flush=True)
            print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'peak_rss_mib':36s} {figures['peak_rss_mib']:10.0f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
