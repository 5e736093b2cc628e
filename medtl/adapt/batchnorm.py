"""Adapting a trained model to a new site without labels: BatchNorm statistics re-estimated on the
target images (AdaBN, Li et al. 2016), entropy minimisation at test time (TENT, Wang et al. 2021),
and self-training on confident pseudo-labels.

medtl trains with the encoder's BatchNorm statistics frozen at their ImageNet values
(``train.freeze_bn``): the network learnt the source images as those statistics normalise them,
which is not standardised. Plain AdaBN, which puts the target's own statistics in their place,
would standardise the target's activations and so move them away from what the head learnt. The
default here is **source-matched** AdaBN: each BatchNorm layer gets the statistics that map the
target's activations onto the distribution the source's had at that layer,

    sigma' = sigma_r * s_target / s_source,   mu' = m_target - sigma' * (m_source - mu_r) / sigma_r,

with the source's moments of each layer's input recorded at training (``RUN/bn_source.safetensors``)
and the target's measured layer after layer in one pass (each layer corrected with its batch's
moments as the pass goes, so deeper layers see the corrected activations; two more passes measure
each layer with the statistics set so far and set them again). ``source_stats=None``
gives plain AdaBN. TENT then trains only the BatchNorm scales and shifts to make the target's
predictions confident, with a term that keeps the classes' mean prediction spread (the
information-maximisation form, Liang et al. 2020), which stops binary tasks from collapsing onto
one class; the statistics are re-matched afterwards.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.batchnorm import _BatchNorm

from medtl.errors import ConfigError
from medtl.options import ADAPT_METHODS
from medtl.run import RunDir
from medtl.runtime import Runtime

log = logging.getLogger("medtl.adapt")
BN_FILE = RunDir.BN_SOURCE
METHODS = ADAPT_METHODS  # (medtl.options)


def batchnorms(model: torch.nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


class _Moments:
    """Per-channel running sums of a layer's inputs: their mean and (biased) variance over everything seen."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        x = x.detach().double()
        s, s2 = x.sum(dims), (x * x).sum(dims)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.numel() // x.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean.float(), (self.s2 / self.n - mean * mean).clamp_min(0).float()


def _inputs(batches: Iterable[torch.Tensor], runtime: Runtime) -> Iterable[torch.Tensor]:
    for x in batches:
        yield runtime.to_input(x)


@torch.no_grad()
def bn_statistics(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], runtime: Runtime | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The mean and variance of every BatchNorm layer's input over ``batches`` (model inputs), with the
    model as it is (eval mode): what :func:`adabn` matches a target to. Saved in a run by
    :func:`save_bn_statistics`."""
    runtime = Runtime.of(model, runtime)
    layers = batchnorms(model)
    moments = {name: _Moments() for name in layers}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: moments[name].add(inp[0])) for name, m in layers.items()
    ]
    model.eval()
    try:
        for x in _inputs(batches, runtime):
            with runtime.autocast():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: mo.result() for name, mo in moments.items() if mo.n}


def _post(module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """What a BatchNorm subclass does after normalising (timm's BatchNormAct2d: dropout, activation)."""
    if hasattr(module, "drop"):
        y = module.drop(y)
    if hasattr(module, "act"):
        y = module.act(y)
    return y


class _Matched:
    """Forward hooks that make every BatchNorm layer normalise a batch by the batch's own moments and map
    it onto the source's distribution at that layer (plain batch normalisation without source moments);
    they also record the moments of each layer's input."""

    def __init__(self, model: torch.nn.Module, source: dict | None, record: bool = True):
        self.layers = batchnorms(model)
        self.source = source
        self.moments = {name: _Moments() for name in self.layers}
        self.record = record
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0]
            if self.record:
                self.moments[name].add(x)
            dims = [0, *range(2, x.dim())]
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            z = (x - mean) / torch.sqrt(var + module.eps)
            if self.source is not None and name in self.source:
                s_mean, s_var = (t.to(x.device, x.dtype).view(shape) for t in self.source[name])
                r_std = torch.sqrt(module.running_var.to(x.dtype).view(shape) + module.eps)
                r_mean = module.running_mean.to(x.dtype).view(shape)
                z = z * torch.sqrt(s_var + module.eps) / r_std + (s_mean - r_mean) / r_std
            if module.affine:
                z = z * module.weight.view(shape) + module.bias.view(shape)
            return _post(module, z)

        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def measured(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The moments of each layer's input over the data seen."""
        return {name: mo.result() for name, mo in self.moments.items() if mo.n}


def _assign(layers: dict[str, _BatchNorm], measured: dict, original: dict, source: dict | None) -> None:
    """Set each layer's statistics from its input's ``measured`` moments: matched to the ``source``'s through
    the ``original`` statistics, or (no source moments) the measured ones themselves."""
    for name, m in layers.items():
        if name not in measured:
            continue
        device = m.running_mean.device
        t_mean, t_var = (t.to(device) for t in measured[name])
        if source is not None and name in source:
            _match(m, *original[name], t_mean, t_var, *(t.to(device) for t in source[name]))
        else:
            m.running_mean.copy_(t_mean)
            m.running_var.copy_(t_var)


@torch.no_grad()
def adabn(
    model: torch.nn.Module,
    batches: Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor],
    source_stats: dict | None = None,
    runtime: Runtime | None = None,
    passes: int = 3,
) -> torch.nn.Module:
    """Re-estimate every BatchNorm layer's statistics on the target ``batches`` (unlabelled model inputs,
    or a function giving them anew), in place: matched to ``source_stats`` (from :func:`bn_statistics` on
    the source) or, without them, the target's own (plain AdaBN). Nothing else changes.

    The first pass normalises each batch by its own moments as it goes; each further pass measures
    every layer's input moments with the statistics set so far (as prediction will see them) and sets
    them again, so that the layers' corrections agree with one another (``passes``, default 3)."""
    runtime = Runtime.of(model, runtime)
    again = batches if callable(batches) else (lambda seen=list(batches): iter(seen))
    model.eval()
    layers = batchnorms(model)
    original = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    hooks = _Matched(model, source_stats)
    try:
        for x in _inputs(again(), runtime):
            with runtime.autocast():
                model(x)
    finally:
        hooks.remove()
    _assign(layers, hooks.measured(), original, source_stats)
    for _ in range(passes - 1):
        _assign(layers, bn_statistics(model, again(), runtime), original, source_stats)
    return model


def _match(m: _BatchNorm, r_mean, r_var, t_mean, t_var, s_mean, s_var) -> None:
    """Set ``m``'s statistics so that inputs of moments (t_mean, t_var) come out as inputs of moments
    (s_mean, s_var) did under the statistics (r_mean, r_var)."""
    r_std = torch.sqrt(r_var + m.eps)
    new_std = r_std * torch.sqrt(t_var + m.eps) / torch.sqrt(s_var + m.eps)
    m.running_mean.copy_(t_mean - new_std * (s_mean - r_mean) / r_std)
    m.running_var.copy_((new_std**2 - m.eps).clamp_min(0))


def information_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy minus the entropy of the mean prediction (confident, and not all one class)."""
    p = logits.float().softmax(dim=1)
    entropy = -(p * torch.log(p + 1e-8)).sum(1).mean()
    mean = p.mean(0)
    return entropy + (mean * torch.log(mean + 1e-8)).sum()


def tent(
    model: torch.nn.Module,
    batches: Callable[[], Iterable[torch.Tensor]],
    source_stats: dict | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    runtime: Runtime | None = None,
) -> torch.nn.Module:
    """TENT on the target: only the BatchNorm scales and shifts are trained, by :func:`information_loss`,
    with each batch normalised by its own moments (matched to the source's when ``source_stats`` are
    given); then the statistics are set by :func:`adabn`. ``batches()`` gives one epoch of unlabelled
    model inputs (shuffled, batches of 16 or more)."""
    runtime = Runtime.of(model, runtime)
    params = []
    for p in model.parameters():
        p.requires_grad_(False)
    for m in batchnorms(model).values():
        if m.affine:
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    optimiser = torch.optim.Adam(params, lr=lr)
    model.eval()  # dropout off; the hooks do the normalisation
    hooks = _Matched(model, source_stats, record=False)
    try:
        for _ in range(epochs):
            for x in _inputs(batches(), runtime):
                with runtime.autocast():
                    loss = information_loss(model(x))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        hooks.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    return adabn(model, batches, source_stats, runtime)


def adapt(
    model: torch.nn.Module,
    method: str,
    batches: Callable[[], Iterable[torch.Tensor]],
    source_stats: dict | None,
    runtime: Runtime | None = None,
    **options,
) -> torch.nn.Module:
    """A copy of ``model`` adapted to the target by ``method`` (one of :data:`METHODS`)."""
    model = copy.deepcopy(model)
    if method == "adabn":
        if source_stats is None:
            raise ConfigError(
                None,
                "source-matched AdaBN without the source's BatchNorm statistics",
                "the run's bn_source.safetensors, or adabn_plain",
            )
        return adabn(model, batches, source_stats, runtime)
    if method == "adabn_plain":
        return adabn(model, batches, None, runtime)
    if method == "tent":
        return tent(model, batches, source_stats, runtime=runtime, **options)
    raise ConfigError(None, f"adaptation method {method!r}", " or ".join(METHODS))


def save_bn_statistics(stats: dict, run_dir: str | Path) -> Path:
    path = Path(run_dir) / BN_FILE
    tensors = {
        f"{name}|{part}": t.contiguous().cpu()
        for name, (mean, var) in stats.items()
        for part, t in (("mean", mean), ("var", var))
    }
    save_file(
        tensors,
        str(path),
        metadata={
            "what": "mean and variance of each BatchNorm layer's input over the source training inputs (medtl.adapt)"
        },
    )
    return path


def load_bn_statistics(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / BN_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    names = {k.rsplit("|", 1)[0] for k in tensors}
    return {n: (tensors[f"{n}|mean"], tensors[f"{n}|var"]) for n in names}


__all__ = [
    "adabn",
    "tent",
    "adapt",
    "bn_statistics",
    "information_loss",
    "save_bn_statistics",
    "load_bn_statistics",
    "METHODS",
    "BN_FILE",
]
