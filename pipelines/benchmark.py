"""medtl's speed figures, each measured against a baseline in the same run.

    python pipelines/benchmark.py [--json results.json] [--sections train] [--no-compile] [--quick] [--device cuda]

``--quick`` prints the same figures from a small, fast run (64 px inputs, batches of 4, 2 epochs of
a few dozen images, a 20-slice series scaled to 100 slices, no torch.compile, one timing per figure
instead of the best of several): a check that the script and its baselines work, not a measurement
to quote.

Training figures are measured on ``--device`` (default: a GPU where one can be reached, else the CPU),
so the ratio of medtl's loop to the raw step reads the same on both. On a GPU the defaults grow to
batches of 64 over 768 generated images (the issue's reference batch), on a CPU they stay at 16.

Sections (all on generated sample data, so the script runs anywhere):
  io        decode + preprocessing throughput: medtl's chain with and without its decoded-input
            cache vs a plain MONAI LoadImage + transforms pipeline (images/s for 2D DICOM files,
            slices/s for a 100-slice DICOM series)
  train     training throughput: the plain fp32 NCHW loop a user writes first
            (plain_train_img_per_s); the best raw configuration, compute only on synthetic tensors,
            each native precision and memory layout, and the best of those compiled
            (best_raw_train_img_per_s); medtl's own loop on decoded sample data with augmentation,
            precision auto (train_img_per_s). Target: train_img_per_s >= 0.95 x best raw. Then medtl's loop
            with fp32 and with bf16 forced against the raw channels-last step in the same precision
            (train_vs_raw_fp32, train_vs_raw_bf16; bf16 emulated where the CPU has none), and medtl's loop
            beside one competing CPU-bound process, its threads fitted to the free cores and fixed at
            the usable cores (contended_slowdown, contended_slowdown_fixed_threads: times slower than alone)
  probe     head-only (linear-probe) training time with and without feature caching
  infer     prediction and Grad-CAM latency per image and per 100-slice volume; prediction of one image
            by the same run exported to ONNX (ONNX Runtime) against PyTorch, both on the CPU: the whole
            prediction (reading the file included) and the network's forward pass alone
  evaluate  `medtl evaluate` on a run trained like `make demo`'s, with its defaults (evaluate_seconds;
            target < 60 s on 2 cores) and with every check (all four saliency methods and the label
            randomisation test, the defaults before: evaluate_all_checks_seconds)
Peak memory (max RSS) is reported at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRange, SpatialPad
from torch.utils.data import DataLoader

from medtl.config import load_config
from medtl.data import create_sample_data, create_sample_series, read_dataset
from medtl.export import export_run
from medtl.io import read_series
from medtl.models import create_encoder, resolve_preprocessing
from medtl.predict import Predictor, load_run
from medtl.runtime import (
    Runtime,
    cpu_model,
    measure_training_speed,
    native_bf16,
    precision_candidates,
    resolve_device,
    synchronize,
)
from medtl.threads import fit_threads, usable_cores
from medtl.train import prepare_data, run_experiment, train_model
from medtl.transforms import create_transforms

CPU = torch.device("cpu")
SECTIONS = ("io", "train", "probe", "infer", "evaluate")
ENCODER = "efficientnet_lite0"  # every figure's network: the raw baselines build it by name, the loops from config


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call: the best of ``repeat`` calls (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Scale(NamedTuple):  # not a dataclass: the tests import this script without registering it in sys.modules
    """How much work each section does: the full benchmark, or ``--quick``."""

    sample_patients: int = 48  # 2D sample images: 2 per patient (io, probe, infer)
    train_patients: int = 128  # images for the training loops: 2 per patient
    series_slices: int = 100  # the DICOM series (io, infer); its figures are per 100 slices
    image_px: int = 128  # side of the generated images
    probe_epochs: int = 10
    repeat: int = 3  # timings per figure (the best counts)
    batch_size: int = 16
    size: int = 224  # encoder input size


FULL = Scale()
GPU = Scale(train_patients=640, batch_size=64)  # 768 training images: 12 steps of 64 per epoch
QUICK = Scale(
    sample_patients=12,
    train_patients=16,
    series_slices=20,
    image_px=64,
    probe_epochs=2,
    repeat=1,
    batch_size=4,
    size=64,
)


def bench_io(work: Path, size: int, repeat: int = 3) -> dict:
    """Decode + preprocessing throughput of medtl's chain (with and without its decoded-input cache) against a
    plain MONAI pipeline, for 2D files and a DICOM series."""
    manifest = work / "sample" / "manifest.csv"
    files = [r["image"] for r in read_dataset(manifest).records]
    data = load_config(data={"path": str(manifest), "augment": False}).data
    pre = resolve_preprocessing(create_encoder(ENCODER, pretrained=False), size)
    det, final = create_transforms(data, pre, train=False)
    records = [{"image": f, "label": 0} for f in files]
    cold = timed(lambda: [final(det(r)) for r in records], repeat)
    cached = [det(r) for r in records]
    warm = timed(lambda: [final({"image": c["image"], "label": 0}) for c in cached], repeat)
    plain = Compose(
        [
            LoadImage(image_only=True, reader="PydicomReader"),
            EnsureChannelFirst(),
            ScaleIntensityRange(-160, 240, 0, 1, clip=True),
            Resize(size, size_mode="longest"),
            SpatialPad((size, size)),
        ]
    )
    base = timed(lambda: [plain(f) for f in files], repeat)
    n = len(files)
    out = {
        "io_2d_files": n,
        "io_2d_medtl_img_per_s": n / cold,
        "io_2d_medtl_cached_img_per_s": n / warm,
        "io_2d_plain_monai_img_per_s": n / base,
    }
    series = work / "series"
    n_slices = len(list(series.iterdir()))
    t_medtl = timed(lambda: read_series(series), repeat)
    t_plain = timed(lambda: LoadImage(image_only=True, reader="PydicomReader")(str(series)), repeat)
    out.update(
        io_series_slices=n_slices,
        io_series_medtl_slices_per_s=n_slices / t_medtl,
        io_series_plain_monai_slices_per_s=n_slices / t_plain,
    )
    return out


def _prepared(manifest: Path, size: int, augment: bool):
    """(experiment, a fresh pretrained encoder with a 2-class head, its (train, val, test) data sets)."""
    cfg = load_config(data={"path": str(manifest), "augment": augment}, encoder={"name": ENCODER, "input_size": size})
    model = create_encoder(ENCODER, num_classes=2)
    pre = resolve_preprocessing(model, size)
    prepared = prepare_data(cfg.data, pre, 0)
    return cfg, model, prepared.datasets(cfg.data, pre)


def plain_loop(train_ds, size: int, epochs: int, batch_size: int, device: torch.device) -> float:
    """The loop a user writes first: timm model, NCHW, fp32, BatchNorm in train mode, AdamW, a DataLoader
    running the per-sample chain in the main process, each batch copied to the device."""
    model = create_encoder(ENCODER, num_classes=2).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True)
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if epoch == 1:  # the first epoch is a warm-up (allocator, oneDNN kernel choice): not timed
            n, t0 = 0, time.perf_counter()
        for batch in loader:
            x, y = batch["image"].to(device), torch.as_tensor(batch["label"]).long().to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(batch["image"])
    synchronize(device)
    return n / (time.perf_counter() - t0)


def raw_train_speed(
    size: int,
    batch_size: int,
    precision: str,
    channels_last: bool,
    compile_: bool,
    steps: int = 6,
    repeats: int = 3,
    device: torch.device = CPU,
) -> float:
    """Images/s of the training computation alone (medtl.runtime.measure_training_speed): synthetic
    tensors already in memory, the whole model trainable, BatchNorm statistics frozen (as medtl's
    default ``freeze_bn``), AdamW; ``steps`` consecutive steps timed together, the best of ``repeats``."""
    torch.manual_seed(0)
    model = create_encoder(ENCODER, num_classes=2)
    return measure_training_speed(
        model,
        (3, size, size),
        batch_size,
        Runtime(device, precision=precision, channels_last=channels_last),
        steps,
        repeats,
        frozen_bn=True,
        compile_model=compile_,
    )


def progress(figures: dict) -> dict:
    """``figures`` printed as soon as they are measured (a run stopped at a time limit keeps them), then returned."""
    for k, v in figures.items():
        print(f"  ({k} {v:.2f})" if isinstance(v, float) else f"  ({k} {v})", flush=True)
    return figures


def bench_raw(
    size: int, batch_size: int, steps: int, compile_best: bool = True, repeats: int = 3, device: torch.device = CPU
) -> dict:
    """The best raw configuration: each precision this hardware runs natively (fp32 always; bf16 where
    native, emulated bf16 being far slower) in NCHW and channels-last, then the best of those compiled."""
    out, speeds = {}, {}
    for precision in precision_candidates(device):
        for cl in (False, True):
            key = f"{precision}_{'channels_last' if cl else 'nchw'}"
            speeds[key] = raw_train_speed(size, batch_size, precision, cl, False, steps, repeats, device)
            out[f"raw_{key}_img_per_s"] = speeds[key]
    best = max(speeds, key=speeds.get)
    if compile_best:
        precision, layout = best.split("_", 1)
        compiled = raw_train_speed(size, batch_size, precision, layout == "channels_last", True, steps, repeats, device)
        out[f"raw_{best}_compiled_img_per_s"] = compiled
        if compiled > speeds[best]:
            speeds[f"{best}_compiled"] = compiled
            best = f"{best}_compiled"
    out.update(best_raw_train_config=best, best_raw_train_img_per_s=speeds[best])
    return out


def bench_train(
    work: Path,
    size: int,
    epochs: int,
    batch_size: int,
    compile_best: bool = True,
    n_patients: int = 128,
    image_px: int = 128,
    repeats: int = 3,
    device: torch.device = CPU,
    contend: bool = True,
) -> dict:
    """medtl's loop (precision auto; eager, and compiled too where a compiled raw configuration is the
    fastest) on decoded sample data with augmentation, between two measurements of the raw
    computation; each side's figure is its best timed stretch of one epoch's steps."""
    manifest = work / "train_sample" / "manifest.csv"
    create_sample_data(manifest.parent, n_patients=n_patients, n_volumes=0, size=image_px, force=True)
    cfg, _, (train, val, _) = _prepared(manifest, size, augment=True)
    steps = len(train) // batch_size
    if steps < 1:
        raise SystemExit(f"the training split has {len(train)} images, fewer than one batch of {batch_size}")
    raw = progress(bench_raw(size, batch_size, steps, compile_best, repeats, device))
    plain = progress({"plain_train_img_per_s": plain_loop(train, size, epochs, batch_size, device)})[
        "plain_train_img_per_s"
    ]
    # medtl's loop eager, and compiled too when a compiled raw configuration was the fastest; its best counts
    compiled_too = raw["best_raw_train_config"].endswith("compiled")
    loops, precision, n_timed = medtl_loop_speeds(cfg, train, val, steps, epochs, batch_size, compiled_too, device)
    progress({f"train_{k}_img_per_s": v for k, v in loops.items()})
    medtl = max(loops.values())
    again = raw_config_speed(raw["best_raw_train_config"], size, batch_size, steps, repeats, device)
    best_raw = max(raw["best_raw_train_img_per_s"], again)  # the raw figure least disturbed by the machine
    per_precision = progress(precision_ratios(cfg, train, val, steps, epochs, batch_size, raw, size, repeats, device))
    contended = {}
    if contend:
        contended = contended_speeds(cfg, train, val, steps, epochs, batch_size, device, loops["eager"])
    return {
        **raw,
        "best_raw_train_img_per_s": best_raw,
        "device": str(device),
        "train_input_px": size,
        "train_batch_size": batch_size,
        "train_images": len(train),
        "train_precision": precision,
        "train_timed_epochs": n_timed,
        **{f"train_{k}_img_per_s": v for k, v in loops.items()},
        "plain_train_img_per_s": plain,
        "train_img_per_s": medtl,
        "speedup": medtl / plain,
        "train_vs_best_raw": medtl / best_raw,
        **per_precision,
        **contended,
    }


def precision_ratios(
    cfg, train, val, steps: int, epochs: int, batch_size: int, raw: dict, size: int, repeats: int, device
) -> dict:
    """medtl's eager loop with each precision forced (``MEDTL_PRECISION``; bf16 emulated where the hardware has
    none) against the raw channels-last step in the same precision, measured in alternation (raw, medtl, raw,
    medtl, ...: ``repeats`` pairs where native, one where emulated, about 12x slower), so that a quiet or a busy
    minute of a shared machine falls on both sides: ``train_vs_raw_{fp32,bf16}`` is the median of the pairs'
    ratios. Each medtl measurement is a 2-epoch run whose second epoch is timed."""
    out = {}
    for precision in ("fp32", "bf16"):
        native = f"raw_{precision}_channels_last_img_per_s" in raw
        ratios, loop_speeds, raw_speeds = [], [], []
        for _ in range(repeats if native else 1):
            raw_speeds.append(raw_train_speed(size, batch_size, precision, True, False, steps, 1, device))
            with _env(MEDTL_PRECISION=precision):
                loops, _, _ = medtl_loop_speeds(cfg, train, val, steps, 2, batch_size, False, device)
            loop_speeds.append(loops["eager"])
            ratios.append(loop_speeds[-1] / raw_speeds[-1])
        kind = "" if native else "emulated_"
        out[f"paired_{kind}raw_{precision}_channels_last_img_per_s"] = statistics.median(raw_speeds)
        out[f"train_{precision}_img_per_s"] = statistics.median(loop_speeds)
        out[f"train_vs_raw_{precision}"] = statistics.median(ratios)
    return out


@contextlib.contextmanager
def competing_process():
    """One CPU-bound process (a Python busy loop) on this process's cores, for as long as the block runs; the
    compute threads are fitted again when it starts and when it ends."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, os.sched_getaffinity(0))
        time.sleep(0.5)
        fit_threads(now=True)
        yield
    finally:
        hog.kill()
        hog.wait()
        fit_threads(now=True)


def contended_speeds(
    cfg, train, val, steps: int, epochs: int, batch_size: int, device: torch.device, alone: float
) -> dict:
    """medtl's loop beside one competing CPU-bound process, with its compute threads fitted to the free cores (the
    default) and fixed at the usable cores (``MEDTL_THREADS``: what medtl did before it fitted them); each as a
    slowdown against ``alone`` (medtl's loop measured alone in the same run). CPU only."""
    if device.type != "cpu":
        return {}
    out = {}
    for name, fixed in (("fitted", None), ("fixed_threads", str(usable_cores()))):
        with competing_process(), _env(MEDTL_THREADS=fixed):
            loops, _, _ = medtl_loop_speeds(cfg, train, val, steps, epochs, batch_size, False, device)
            out[f"contended_{name}_threads"] = torch.get_num_threads()
        out[f"contended_{name}_img_per_s"] = loops["eager"]
    out["contended_slowdown"] = alone / out["contended_fitted_img_per_s"]
    out["contended_slowdown_fixed_threads"] = alone / out["contended_fixed_threads_img_per_s"]
    return out


@contextlib.contextmanager
def _env(**values):
    """Environment variables set (or, given None, left as they are) for the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def medtl_loop_speeds(
    cfg, train, val, steps: int, epochs: int, batch_size: int, compiled_too: bool, device: torch.device
) -> tuple[dict[str, float], str, int]:
    """Images/s of medtl's loop (strategy full) on ``train``, eager and, with ``compiled_too``, compiled, each its
    best timed epoch of ``steps`` steps; the precision the last one chose; how many epochs were timed."""
    loops = {}
    for compiled in (False, True) if compiled_too else (False,):
        tc = dataclasses.replace(
            cfg.train,
            strategy="full",
            epochs=epochs,
            batch_size=batch_size,
            patience=epochs + 1,
            compile=compiled,
            device=str(device),
        )
        _, result = train_model(dataclasses.replace(cfg, train=tc), train, val, 2)  # (seeded with train.seed, 0)
        timed_epochs = result.history[1:]  # the first epoch is a warm-up (and fills the input cache)
        loops["compiled" if compiled else "eager"] = steps * batch_size / min(r["seconds"] for r in timed_epochs)
    return loops, result.precision, len(timed_epochs)


def raw_config_speed(config: str, size: int, batch_size: int, steps: int, repeats: int, device: torch.device) -> float:
    """:func:`raw_train_speed` of a configuration named as :func:`bench_raw` names them (``bf16_channels_last``,
    ``fp32_nchw_compiled``, ...)."""
    precision, layout = config.split("_", 1)
    return raw_train_speed(
        size,
        batch_size,
        precision,
        layout.startswith("channels_last"),
        layout.endswith("compiled"),
        steps,
        repeats,
        device,
    )


def bench_probe(work: Path, size: int, epochs: int) -> dict:
    manifest = work / "sample" / "manifest.csv"
    out = {"probe_epochs": epochs}
    for cache in (True, False):
        cfg, model, (train, val, _) = _prepared(manifest, size, augment=False)
        tc = dataclasses.replace(
            cfg.train, strategy="linear_probe", epochs=epochs, cache_features=cache, patience=epochs + 1
        )
        probe = functools.partial(train_model, dataclasses.replace(cfg, train=tc), train, val, 2, model=model)
        out[f"probe_seconds_{'cached' if cache else 'uncached'}"] = timed(probe)
    out["probe_speedup"] = out["probe_seconds_uncached"] / out["probe_seconds_cached"]
    return out


def _infer_image(predictor: Predictor, run: Path, image: str, work: Path, repeat: int) -> dict:
    """Latency of one image's prediction and Grad-CAM; the same run exported to ONNX, run by ONNX Runtime on the
    CPU, against PyTorch on the CPU: the whole prediction (the same file, read the same way) and the forward pass."""
    predictor.predict(image, check=False)
    out = {
        "infer_image_predict_ms": 1000 * timed(lambda: predictor.predict(image, check=False), repeat),
        "infer_image_explain_ms": 1000 * timed(lambda: predictor.explain(image, check=False), repeat),
    }
    onnx = load_run(export_run(run, work / "run_onnx", "onnx", force=True), device="cpu", backend="onnx")
    torch_cpu = load_run(run, device="cpu")
    for p in (onnx, torch_cpu):
        p.predict(image, check=False)
    out["infer_image_predict_torch_cpu_ms"] = 1000 * timed(lambda: torch_cpu.predict(image, check=False), repeat)
    out["infer_image_predict_onnx_cpu_ms"] = 1000 * timed(lambda: onnx.predict(image, check=False), repeat)
    x = torch_cpu.inputs(torch_cpu.read(image))[0]
    out["infer_forward_torch_cpu_ms"] = 1000 * timed(lambda: torch_cpu._probs(x), repeat)
    out["infer_forward_onnx_cpu_ms"] = 1000 * timed(lambda: onnx._probs(x), repeat)
    return out


def _infer_volume(predictor: Predictor, series: Path) -> dict:
    """Prediction and Grad-CAM seconds per 100-slice volume (the series timed, scaled to 100 slices)."""
    per_100 = 100 / len(list(series.iterdir()))
    return {
        "infer_volume100_predict_s": per_100 * timed(lambda: predictor.predict(series, check=False)),
        "infer_volume100_explain_s": per_100 * timed(lambda: predictor.explain(series, check=False)),
    }


def bench_infer(work: Path, size: int, repeat: int = 5) -> dict:
    """Latency per image and per 100-slice volume (a shorter series is timed and scaled to 100 slices)."""
    manifest = work / "sample" / "manifest.csv"
    out = {}
    for mode in ("middle", "slices"):
        cfg = load_config(
            data={"path": str(manifest), "augment": False, "volume_mode": mode},
            encoder={"input_size": size},
            train={"epochs": 1, "frozen_epochs": 1},
            explain={"n_overlays": 0},
        )
        run = run_experiment(cfg, work / f"run_{mode}", force=True)
        predictor = load_run(run)
        if mode == "middle":
            out.update(_infer_image(predictor, run, read_dataset(manifest).records[0]["image"], work, repeat))
        else:
            out.update(_infer_volume(predictor, work / "series"))
    return out


def bench_evaluate(work: Path, quick: bool) -> dict:
    """``medtl evaluate`` on a run trained as ``make demo`` trains it (the sample set and the default recipe;
    ``--quick``: a smaller set, 64 px, one epoch per stage): with its defaults, and with every check (all four
    saliency methods and the label randomisation test: the defaults before they were made opt-in)."""
    sample = work / "demo_sample"
    if quick:
        create_sample_data(sample, n_patients=16, n_volumes=4, size=64, force=True)
        cfg = load_config(
            data={"path": str(sample / "manifest.csv")},
            encoder={"input_size": 64},
            train={"epochs": 1, "frozen_epochs": 1},
        )
    else:
        create_sample_data(sample, force=True)  # what `medtl sample-data` writes
        demo = Path(__file__).resolve().parents[1] / "configs" / "sample_ct.yaml"  # make demo's recipe
        cfg = load_config(demo, data={"path": str(sample / "manifest.csv")})
    run = run_experiment(cfg, work / "run_demo", force=True)

    def command(*flags: str) -> None:  # the command as typed: its start-up (imports) counts
        done = subprocess.run(
            [sys.executable, "-m", "medtl.cli", "-q", "evaluate", str(run), *flags], text=True, capture_output=True
        )
        if done.returncode != 0:
            raise SystemExit(f"medtl evaluate failed:\n{done.stderr[-2000:]}")

    default = timed(command)
    everything = timed(lambda: command("--methods", "all", "--data-randomisation"))
    return {
        "evaluate_seconds": default,
        "evaluate_all_checks_seconds": everything,
        "evaluate_speedup": everything / default,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--size", type=int, help="encoder input size in pixels (default 224; 64 with --quick)")
    p.add_argument(
        "--epochs", type=int, help="training epochs per loop, the first untimed (default 4; 2 with --quick; at least 2)"
    )
    p.add_argument("--batch-size", type=int, help="default 16 (64 on a GPU); 4 with --quick")
    p.add_argument(
        "--device",
        default="auto",
        help="where the training figures are measured: auto (a GPU where one can be reached), cpu, cuda or cuda:N",
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations (about 70 s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the same figures from a small, fast run (implies --no-compile): a smoke test, not a measurement",
    )
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    scale = QUICK if args.quick else GPU if device.type == "cuda" else FULL
    size = args.size or scale.size
    epochs = args.epochs or (2 if args.quick else 4)
    batch_size = args.batch_size or scale.batch_size
    compile_best = not (args.no_compile or args.quick)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is an untimed warm-up)")
    logging.basicConfig(level=logging.WARNING)
    figures = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_bf16": native_bf16(CPU),
        "quick": args.quick,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        create_sample_data(
            work / "sample", n_patients=scale.sample_patients, n_volumes=0, size=scale.image_px, force=True
        )
        create_sample_series(work / "series", n_slices=scale.series_slices, size=scale.image_px)
        steps = {
            "io": lambda: bench_io(work, size, scale.repeat),
            "train": lambda: bench_train(
                work, size, epochs, batch_size, compile_best, scale.train_patients, scale.image_px, scale.repeat, device
            ),
            "probe": lambda: bench_probe(work, size, scale.probe_epochs),
            "infer": lambda: bench_infer(work, size, 5 if scale.repeat > 1 else 1),
            "evaluate": lambda: bench_evaluate(work, args.quick),
        }
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
