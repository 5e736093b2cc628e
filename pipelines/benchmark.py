"""medtl's speed figures, each measured against a baseline in the same run.

    python pipelines/benchmark.py [--json results.json] [--sections train] [--no-compile] [--quick] [--device cuda]

``--quick`` prints the same figures from a small, fast run (64 px inputs, batches of 4, 2 epochs of
a few dozen images, a 20-slice series scaled to 100 slices, no torch.compile, one timing per figure
instead of the best of several): a check that the script and its baselines work, not a measurement
to quote.

On a CPU with native bf16, ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` in the environment measures the
AVX2-only path (oneDNN and ATen kernels limited to AVX2, bf16 then emulated); ``cpu_capability`` and
``onednn_max_cpu_isa`` in the JSON say which path a run measured.

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
            (best_raw_train_config, best_raw_train_img_per_s); medtl's own loop on decoded sample data
            with augmentation, precision auto, with the raw step timed after each of its epochs (in the
            best configuration and channels-last in each native precision: two precisions that run
            about as fast trade places from one minute to the next on a shared machine), so each timed
            epoch lies between two raw measurements seconds apart: train_vs_best_raw is the median over
            the timed epochs of the epoch's images/s over the fastest raw configuration either side
            (target >= 0.95; train_vs_raw_same_precision: over the raw step in the loop's own precision;
            train_img_per_s and paired_best_raw_train_img_per_s are the two sides' medians,
            train_vs_best_raw_epochs the per-epoch ratios, train_vs_best_raw_best_of the
            earlier definition: best epoch over best raw figure). Where a step goes: milliseconds per
            step of reading, augmenting and re-laying out a batch, timed alone (step_*_ms). Then the
            same with fp32 and with bf16 forced against the raw channels-last step in the same
            precision (train_vs_raw_fp32, train_vs_raw_bf16; bf16 emulated where the CPU has none), and
            medtl's loop beside one competing CPU-bound process, its threads fitted to the free cores
            and fixed at the usable cores (contended_slowdown, contended_slowdown_fixed_threads: times
            slower than alone)
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
from medtl.data.dataset import iterate_batches
from medtl.export import export_run
from medtl.io import read_series
from medtl.models import create_encoder, resolve_preprocessing
from medtl.predict import Predictor, load_run
from medtl.runtime import (
    Runtime,
    cpu_model,
    native_bf16,
    precision_candidates,
    resolve_device,
    synchronize,
    training_step_timer,
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


def raw_timer(config: str, size: int, batch_size: int, device: torch.device):
    """A function ``steps -> images/s`` timing the training computation alone (medtl.runtime.training_step_timer)
    in a configuration named as :func:`bench_raw` names them (``fp32_nchw``, ``bf16_channels_last``,
    ``fp32_channels_last_compiled``, ...): synthetic tensors already in memory, the whole model trainable,
    BatchNorm statistics frozen (as medtl's default ``freeze_bn``), AdamW as medtl's loop makes it."""
    precision, layout = config.split("_", 1)
    torch.manual_seed(0)
    model = create_encoder(ENCODER, num_classes=2)
    runtime = Runtime(device, precision=precision, channels_last=layout.startswith("channels_last"))
    return training_step_timer(
        model, (3, size, size), batch_size, runtime, frozen_bn=True, compile_model=layout.endswith("compiled")
    )


def raw_speed(config: str, size: int, batch_size: int, steps: int, repeats: int, device: torch.device) -> float:
    """Images/s of the raw step in ``config``: ``steps`` consecutive steps timed together, the best of ``repeats``."""
    timer = raw_timer(config, size, batch_size, device)
    return max(timer(steps) for _ in range(repeats))


def progress(figures: dict) -> dict:
    """``figures`` printed as soon as they are measured (a run stopped at a time limit keeps them), then returned."""
    for k, v in figures.items():
        print(f"  ({k} {_shown(v)})", flush=True)
    return figures


def _shown(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):  # one figure per timed epoch: no spaces, so each printed line stays `name value`
        return ",".join(f"{x:.2f}" for x in v)
    return str(v)


def bench_raw(
    size: int, batch_size: int, steps: int, compile_best: bool = True, repeats: int = 3, device: torch.device = CPU
) -> dict:
    """The best raw configuration: each precision this hardware runs natively (fp32 always; bf16 where
    native, emulated bf16 being far slower) in NCHW and channels-last, then the best of those compiled."""
    out, speeds = {}, {}
    for precision in precision_candidates(device):
        for layout in ("nchw", "channels_last"):
            key = f"{precision}_{layout}"
            speeds[key] = raw_speed(key, size, batch_size, steps, repeats, device)
            out[f"raw_{key}_img_per_s"] = speeds[key]
    best = max(speeds, key=speeds.get)
    if compile_best:
        compiled = raw_speed(f"{best}_compiled", size, batch_size, steps, repeats, device)
        out[f"raw_{best}_compiled_img_per_s"] = compiled
        if compiled > speeds[best]:
            speeds[f"{best}_compiled"] = compiled
            best = f"{best}_compiled"
    out.update(best_raw_train_config=best, best_raw_train_img_per_s=speeds[best])
    return out


class RawBeside:
    """Stands in for medtl's run monitor (:class:`medtl.train.tracking.RunMonitor`) in a benchmark's training run:
    after each of medtl's epochs (and its validation) it times the raw step of each configuration it holds for as
    many steps as an epoch has, so each epoch of the loop lies between two raw measurements taken seconds apart,
    and a quiet or a busy minute of a shared machine falls on both sides of the comparison."""

    resume = checkpoint_path = None  # (a fresh run: nothing to resume from)

    def __init__(self, timers: dict, steps: int):
        self.timers, self.steps = timers, steps
        self.speeds: dict[str, list[float]] = {config: [] for config in timers}

    def part(self, name: str) -> RawBeside:
        return self

    def epoch_end(self, trainer, row: dict) -> None:
        for config, timer in self.timers.items():
            self.speeds[config].append(timer(self.steps))

    def save(self, *args, **kwargs) -> None:
        pass


class LoopRun(NamedTuple):  # (not a dataclass: the tests import this script without registering it in sys.modules)
    """One run of medtl's loop: images/s of each timed epoch and, when measured beside it, of each raw
    configuration's step after each epoch (``raw[config][0]`` after the untimed first epoch, so timed epoch ``i``
    lies between ``raw[config][i]`` and ``raw[config][i + 1]``)."""

    loop: list[float]
    raw: dict[str, list[float]]
    precision: str

    def beside(self, config: str) -> list[float]:
        """Per timed epoch, the raw step of ``config`` either side of it: their harmonic mean (the mean time)."""
        speeds = self.raw[config]
        return [statistics.harmonic_mean(speeds[i : i + 2]) for i in range(len(self.loop))]

    def best_beside(self) -> list[float]:
        """Per timed epoch, the fastest raw configuration at that moment (:meth:`beside`)."""
        return [max(v) for v in zip(*(self.beside(c) for c in self.raw))]

    def ratios(self, config: str | None = None) -> list[float]:
        """Each timed epoch's images/s over the raw step beside it: of ``config``, or of the fastest configuration."""
        raw = self.beside(config) if config else self.best_beside()
        return [v / r for v, r in zip(self.loop, raw)]

    def figures(self, loop_key: str, raw_key: str, ratio_key: str) -> dict:
        """The medians (the per-epoch ratios under ``..._epochs``): loop images/s, the fastest raw configuration
        beside it in images/s, their ratio."""
        return {
            loop_key: statistics.median(self.loop),
            raw_key: statistics.median(self.best_beside()),
            ratio_key: statistics.median(self.ratios()),
            f"{ratio_key}_epochs": self.ratios(),
        }


def medtl_loop(
    cfg, train, val, steps: int, epochs: int, batch_size: int, device, compiled=False, raw=(), size=224
) -> LoopRun:
    """medtl's loop (strategy full) on ``train`` for ``epochs`` epochs, the first an untimed warm-up (it also fills
    the input store); with ``raw`` (configurations as :func:`bench_raw` names them) those raw steps timed after
    each epoch (:class:`RawBeside`)."""
    tc = dataclasses.replace(
        cfg.train,
        strategy="full",
        epochs=epochs,
        batch_size=batch_size,
        patience=epochs + 1,
        compile=compiled,
        device=str(device),
    )
    beside = RawBeside({c: raw_timer(c, size, batch_size, device) for c in raw}, steps)
    _, result = train_model(dataclasses.replace(cfg, train=tc), train, val, 2, monitor=beside if raw else None)
    loop = [steps * batch_size / r["seconds"] for r in result.history[1:]]
    return LoopRun(loop, beside.speeds, result.precision)


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
    """The best raw configuration, the plain loop, then medtl's loop (precision auto; eager, and compiled too where
    a compiled raw configuration is the fastest) on decoded sample data with augmentation, with the raw step timed
    between its epochs in the best configuration and channels-last in each native precision (two precisions
    that run about as fast trade places from one minute to the next on a shared machine): ``train_vs_best_raw``
    is the median over the timed epochs of each epoch's images/s over the fastest of them at that moment
    (``train_vs_raw_same_precision``: over the raw step in the loop's own precision, the same epochs)."""
    manifest = work / "train_sample" / "manifest.csv"
    create_sample_data(manifest.parent, n_patients=n_patients, n_volumes=0, size=image_px, force=True)
    cfg, _, (train, val, _) = _prepared(manifest, size, augment=True)
    steps = len(train) // batch_size
    if steps < 1:
        raise SystemExit(f"the training split has {len(train)} images, fewer than one batch of {batch_size}")
    raw = progress(bench_raw(size, batch_size, steps, compile_best, repeats, device))
    plain = progress({"plain_train_img_per_s": plain_loop(train, size, epochs, batch_size, device)})
    best = raw["best_raw_train_config"]
    configs = list(dict.fromkeys([best] + [f"{p}_channels_last" for p in precision_candidates(device)]))
    # medtl's loop eager, and compiled too when a compiled raw configuration was the fastest; the better counts
    runs = {"eager": medtl_loop(cfg, train, val, steps, epochs, batch_size, device, raw=configs, size=size)}
    if best.endswith("compiled"):
        runs["compiled"] = medtl_loop(cfg, train, val, steps, epochs, batch_size, device, True, configs, size)
    loops = progress({f"train_{k}_img_per_s": statistics.median(r.loop) for k, r in runs.items()})
    kind = max(runs, key=lambda k: statistics.median(runs[k].ratios()))
    run = runs[kind]
    headline = run.figures("train_img_per_s", "paired_best_raw_train_img_per_s", "train_vs_best_raw")
    headline.update({f"beside_raw_{c}_img_per_s": statistics.median(run.beside(c)) for c in configs})
    own = f"{run.precision}_channels_last"
    if own in configs:
        headline["train_vs_raw_same_precision"] = statistics.median(run.ratios(own))
    progress(headline)
    out = {
        **raw,
        "device": str(device),
        "train_input_px": size,
        "train_batch_size": batch_size,
        "train_images": len(train),
        "train_precision": run.precision,
        "train_timed_epochs": len(run.loop),
        **loops,
        **plain,
        **headline,
        "speedup": headline["train_img_per_s"] / plain["plain_train_img_per_s"],
        # the definition before the raw step was timed between the epochs: the best epoch over the best raw figure
        "train_vs_best_raw_best_of": max(run.loop) / max(raw["best_raw_train_img_per_s"], *run.raw[best]),
    }
    out.update(progress(step_parts(cfg, train, batch_size, steps, device, headline["train_img_per_s"])))
    out.update(progress(precision_ratios(cfg, train, val, steps, epochs, batch_size, size, device)))
    if contend:
        out.update(contended_speeds(cfg, train, val, steps, epochs, batch_size, device, loops["train_eager_img_per_s"]))
    return out


def step_parts(cfg, train, batch_size: int, steps: int, device: torch.device, loop_img_per_s: float) -> dict:
    """Where a step of medtl's loop goes: the parts other than the computation timed alone over one epoch of batches
    (gathering a batch from the input store, the batched augmentation, the change of memory layout), in
    milliseconds per step, against the loop's step (at ``loop_img_per_s``)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    augment, to_input = train.transform.batch_augment, Runtime(device).to_input
    t0 = time.perf_counter()
    batches = [b["image"] for b in iterate_batches(train, batch_size, device, order, drop_last=True)]
    t1 = time.perf_counter()
    augmented = [augment(x) for x in batches]
    t2 = time.perf_counter()
    for x in augmented:
        to_input(x)
    synchronize(device)
    t3 = time.perf_counter()
    parts = {"step_read_ms": t1 - t0, "step_augment_ms": t2 - t1, "step_layout_ms": t3 - t2}
    out = {k: 1000 * v / steps for k, v in parts.items()}
    out["step_ms"] = 1000 * batch_size / loop_img_per_s
    out["step_outside_computation_share"] = sum(out[k] for k in parts) / out["step_ms"]
    return out


def precision_ratios(cfg, train, val, steps: int, epochs: int, batch_size: int, size: int, device) -> dict:
    """medtl's eager loop with each precision forced (``MEDTL_PRECISION``; bf16 emulated where the hardware has
    none) with the raw channels-last step in the same precision timed between its epochs: ``train_vs_raw_{fp32,
    bf16}`` is the median over the timed epochs of the epoch's images/s over the raw step's either side. Where bf16
    is emulated (about 12x slower) one epoch is timed."""
    out = {}
    for precision in ("fp32", "bf16"):
        native = precision in precision_candidates(device)
        key = f"{precision}_channels_last"
        with _env(MEDTL_PRECISION=precision):
            run = medtl_loop(cfg, train, val, steps, epochs if native else 2, batch_size, device, False, [key], size)
        loop, raw = f"train_{precision}_img_per_s", f"paired_{'' if native else 'emulated_'}raw_{key}_img_per_s"
        out.update(run.figures(loop, raw, f"train_vs_raw_{precision}"))
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
    slowdown against ``alone`` (medtl's loop measured alone in the same run; medians of the timed epochs). CPU only."""
    if device.type != "cpu":
        return {}
    out = {}
    for name, fixed in (("fitted", None), ("fixed_threads", str(usable_cores()))):
        with competing_process(), _env(MEDTL_THREADS=fixed):
            run = medtl_loop(cfg, train, val, steps, epochs, batch_size, device)
            out[f"contended_{name}_threads"] = torch.get_num_threads()
        out[f"contended_{name}_img_per_s"] = statistics.median(run.loop)
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
        "--epochs", type=int, help="training epochs per loop, the first untimed (default 6; 2 with --quick; at least 2)"
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
    epochs = args.epochs or (2 if args.quick else 6)
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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # (ATEN_CPU_CAPABILITY=avx2 forces the AVX2 path)
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
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
                print(f"{k:36s} {_shown(v):>10}", flush=True)
            print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'peak_rss_mib':36s} {figures['peak_rss_mib']:10.0f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
