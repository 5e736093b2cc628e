"""Where and how a model runs: device, numeric precision, memory layout, flip averaging.

One :class:`Runtime` object carries these settings to everything that runs a model (training,
feature caching, prediction, explanation, evaluation), so none of them hard-codes the CPU or
fp32. Autocast is opened by :meth:`Runtime.autocast` around the model's forward pass only: data
loading and transforms never run under it.

``precision: auto`` is decided by measurement (:func:`choose_precision`): a few training steps of
the actual model, input size and batch size in each candidate precision, the fastest wins. The
answer is cached per host, device, encoder, input shape and batch size. ``MEDTL_PRECISION``
(``fp32``, ``bf16`` or ``fp16``) overrides every configured precision, so a test run can force
the bf16 path on a machine that would never choose it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from medtl.errors import ConfigError

log = logging.getLogger("medtl.runtime")

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_ENV = "MEDTL_PRECISION"  # overrides every configured precision (tests, CI's forced-bf16 run)
CACHE_ENV = "MEDTL_CACHE_DIR"  # folder of the precision probe's answers (default ~/.cache/medtl)
# Measured on an AMX CPU (torch 2.14): bf16 backward passes of MONAI's 3D ResNet-10 gave non-finite gradients in
# 1 of 20 fresh networks (0 of 20 in fp32), and 3 different gradients in 40 repeats of one pass; training runs
# diverged with NaN now and then. So 3D networks train in fp32 on a CPU, whatever precision is asked for.
VOLUME_CPU_REASON = (
    "3D convolutions train in fp32 on a CPU: in bf16 their backward pass gave non-finite and unrepeatable gradients"
)


@dataclass(frozen=True)
class Runtime:
    """How a model is run: one object passed by keyword to everything that runs a model."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model and inputs live
    precision: str = "fp32"  # "fp32", "bf16" or "fp16": autocast dtype of the model's forward pass
    channels_last: bool = True  # NHWC layout for 2D inputs (about 2x faster convolutions on CPU)
    tta: bool = False  # average the logits of each input and its left-right flip

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        if self.precision not in PRECISIONS:
            raise ConfigError(None, f"unknown precision {self.precision!r}", "one of " + ", ".join(PRECISIONS))

    def autocast(self) -> AbstractContextManager:
        """Autocast for the model's forward pass (a no-op context in fp32)."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch moved to the device, in the runtime's memory layout (2D inputs only)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device and layout (3D networks keep the default layout)."""
        model.to(self.device)
        layout = torch.channels_last if self.channels_last and not has_conv3d(model) else torch.contiguous_format
        return model.to(memory_format=layout)

    def replace(self, **changes) -> Runtime:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, model: torch.nn.Module, runtime: Runtime | None = None) -> Runtime:
        """``runtime``, or where none is given the default runtime on the device ``model`` is on (a model
        left on a GPU by training is run there, not fed CPU tensors)."""
        if runtime is not None:
            return runtime
        param = next(model.parameters(), None)
        return cls(param.device if param is not None else torch.device("cpu"))


def has_conv3d(model: torch.nn.Module) -> bool:
    """Whether ``model`` convolves volumes (its inputs are (N, C, D, H, W))."""
    return any(isinstance(m, torch.nn.Conv3d) for m in model.modules())


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"``: the GPU where one can be reached, else the CPU; any other name as torch reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(None, f"unknown device {str(name)!r}", "'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(None, f"device {str(name)!r} but no CUDA GPU can be reached", "device 'auto' or 'cpu'")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware runs bf16 natively (AVX-512 BF16 / AMX on CPU, a bf16 GPU). Elsewhere bf16
    autocast still runs, emulated, and far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_override() -> str | None:
    """The precision forced by ``MEDTL_PRECISION``, or None."""
    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not value:
        return None
    if value not in PRECISIONS:
        raise ConfigError(None, f"{PRECISION_ENV}={value!r} is not a precision", "one of " + ", ".join(PRECISIONS))
    return value


def precision_candidates(device: torch.device) -> tuple[str, ...]:
    """Precisions worth measuring on ``device``: fp32, plus bf16 where native; on a CUDA GPU without bf16,
    fp16 (with a gradient scaler) instead."""
    if device.type == "cuda":
        return ("fp32", "bf16") if native_bf16(device) else ("fp32", "fp16")
    return ("fp32", "bf16") if native_bf16(device) else ("fp32",)


# -- precision by measurement ----------------------------------------------------------------------


@dataclass
class PrecisionChoice:
    """The precision a run uses and how it was chosen."""

    precision: str  # "fp32", "bf16" or "fp16"
    reason: str  # "set in the configuration", "MEDTL_PRECISION", "measured", "cached measurement", ...
    img_per_s: dict[str, float] = field(default_factory=dict)  # training images/s of each candidate measured

    def as_record(self) -> dict:
        return {
            "precision": self.precision,
            "reason": self.reason,
            "img_per_s": {k: round(v, 2) for k, v in self.img_per_s.items()},
        }


def adamw(params, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or parameter groups), torch's fused implementation where ``device`` has one
    (CPU and CUDA: one kernel for all tensors; on 2 CPU cores an EfficientNet-Lite0 step took 2 ms against 8 ms
    tensor by tensor), the default elsewhere. Every training loop of medtl and its speed probe use it."""
    fused = torch.device(device).type in ("cpu", "cuda") or None
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def training_step_timer(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    runtime: Runtime,
    frozen_bn: bool = False,
    compile_model: bool = False,
):
    """A function ``steps -> images/s`` timing ``steps`` consecutive training steps (forward, backward, AdamW
    step) of a copy of ``model`` on random inputs, after an untimed warm-up step here (two when compiling).
    ``frozen_bn`` keeps BatchNorm in eval mode (medtl's ``freeze_bn``). The model is not touched; the copy
    lives as long as the function, so a benchmark can time it again between other work."""
    probe = copy.deepcopy(model)
    runtime.prepare(probe)
    probe.train()
    if frozen_bn:
        for m in probe.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    for p in probe.parameters():
        p.requires_grad_(True)
    net = torch.compile(probe) if compile_model else probe
    optimizer = adamw(probe.parameters(), runtime.device, lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = runtime.to_input(torch.randn(batch_size, *input_shape, generator=gen))
    y = torch.zeros(batch_size, dtype=torch.long, device=runtime.device)

    def step():
        with runtime.autocast():
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2 if compile_model else 1):
        step()

    def timed(steps: int) -> float:
        synchronize(runtime.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(runtime.device)
        return batch_size * steps / (time.perf_counter() - t0)

    return timed


def measure_training_speed(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    runtime: Runtime,
    steps: int = 3,
    repeats: int = 1,
    frozen_bn: bool = False,
    compile_model: bool = False,
) -> float:
    """Training images/s of a copy of ``model`` on random inputs (:func:`training_step_timer`): ``steps``
    consecutive steps timed together after the warm-up, the best of ``repeats``. The model is not touched."""
    timed = training_step_timer(model, input_shape, batch_size, runtime, frozen_bn, compile_model)
    return max(timed(steps) for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished its queued work (a no-op on a CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_key(device: torch.device) -> str:
    """A key for this machine's compute: host name, processor (or GPU) and torch version."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = cpu_model() + f" x{torch.get_num_threads()}"
    return f"{platform.node()}|{hardware}|torch {torch.__version__}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medtl"
    return Path(root) / "precision.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, record: dict) -> None:
    cache = _read_cache()
    cache[key] = record
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:  # a read-only home only costs a repeated probe
        log.debug("precision cache not written (%s)", e)


def choose_precision(
    configured: str,
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    runtime: Runtime,
    model_name: str = "",
    frozen_bn: bool = False,
) -> PrecisionChoice:
    """The precision to train in: ``MEDTL_PRECISION`` if set, else ``configured`` unless it is
    ``"auto"``; for ``"auto"`` the fastest of :func:`precision_candidates` in a short training probe
    of this model, input shape and batch size, with BatchNorm as the loop runs it (``frozen_bn``:
    statistics frozen, medtl's ``freeze_bn``), cached per host and BatchNorm mode. A 3D network on a
    CPU trains in fp32 whatever is asked (see ``VOLUME_CPU_REASON``)."""
    forced = precision_override()
    asked = forced or configured
    if runtime.device.type == "cpu" and asked != "fp32" and has_conv3d(model):
        return PrecisionChoice("fp32", VOLUME_CPU_REASON)
    if forced:
        return PrecisionChoice(forced, f"forced by {PRECISION_ENV}")
    if configured != "auto":
        return PrecisionChoice(configured, "set in the configuration")
    candidates = precision_candidates(runtime.device)
    if len(candidates) == 1:
        return PrecisionChoice(candidates[0], "the only candidate: this hardware runs no bf16 natively")
    name = model_name or type(model).__name__
    digest = hashlib.sha1(
        f"{host_key(runtime.device)}|{runtime.device.type}|{name}|{tuple(input_shape)}|"
        f"{batch_size}|{runtime.channels_last}|{candidates}|bn {'frozen' if frozen_bn else 'train'}".encode()
    ).hexdigest()[:16]
    cached = _read_cache().get(digest)
    if cached and cached.get("precision") in candidates:
        return PrecisionChoice(cached["precision"], "cached measurement", cached.get("img_per_s", {}))
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the probe's dropout must not move the run's random streams
        speeds = {
            p: measure_training_speed(model, input_shape, batch_size, runtime.replace(precision=p), frozen_bn=frozen_bn)
            for p in candidates
        }
    best = max(speeds, key=lambda p: speeds[p])
    choice = PrecisionChoice(best, "measured", speeds)
    _write_cache(digest, {**choice.as_record(), "key": f"{name} {tuple(input_shape)} batch {batch_size}"})
    return choice


def inference_precision(precision: str | None) -> str:
    """Precision of prediction and explanation: ``MEDTL_PRECISION``, else the one given, else fp32
    (exact, reproducible scores; prediction is cheap next to training)."""
    forced = precision_override()
    if forced:
        return forced
    precision = precision or "fp32"
    return "fp32" if precision == "auto" else precision


# -- distributed ---------------------------------------------------------------------------------


def distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun (process group initialised on first use), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("MEDTL_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device, world: int) -> torch.device:
    """This process's GPU under torchrun (LOCAL_RANK); ``device`` otherwise."""
    if world > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


__all__ = [
    "Runtime",
    "PrecisionChoice",
    "resolve_device",
    "has_conv3d",
    "native_bf16",
    "precision_override",
    "synchronize",
    "cpu_model",
    "precision_candidates",
    "choose_precision",
    "inference_precision",
    "measure_training_speed",
    "training_step_timer",
    "adamw",
    "distributed",
    "local_device",
    "PRECISIONS",
    "PRECISION_ENV",
]
