"""One training loop; fine-tuning strategies are data (a list of stages), not copies of the loop.

A :class:`Stage` says which encoder layer groups train and at what learning rates. Layer
groups come from timm's ``group_matcher`` (stem, each stage of blocks, head), so "partial",
"gradual" unfreezing and layer-wise learning-rate decay work the same for every encoder.
Head-only stages train on encoder features extracted once (``cache_features``), which turns a
linear probe into seconds of work. Under ``torchrun`` the same loop runs data-parallel
(DistributedDataParallel, gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.utils import set_determinism
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from medtl.config import TrainConfig
from medtl.data.dataset import InputDataset, iterate_batches, place_store, study_index
from medtl.errors import ConfigError, TrainingDivergedError
from medtl.eval.metrics import compute_auc
from medtl.models.adapters import add_lora, is_bitfit_parameter, is_lora_parameter, merge_lora, plain_state_dict
from medtl.models.groups import ALL, encoder_groups, encoder_modules, head_parameters, set_trainable
from medtl.predict import Logits, extract_features, predict_logits
from medtl.runtime import Runtime, choose_precision, distributed, inference_precision, local_device, \
    measure_training_speed, resolve_device, usable_cores
from medtl.transforms import TrainingTransform

log = logging.getLogger("medtl.train")



@dataclass(frozen=True)
class Stage:
    """A phase of training with one set of trainable parameters and learning rates."""

    name: str  # "head", "partial", "fine_tune", "unfreeze_3", "full"
    epochs: int  # number of epochs in this stage
    trainable: int  # encoder layer groups trained, counted from the top: 0 = head only, ALL = every group
    head_lr: float  # peak learning rate of the classification head
    encoder_lr: float  # peak learning rate of the top trainable encoder group
    layer_decay: float = 1.0  # each lower group's rate = the one above's * this
    params: str = "all"  # which parameters of the trainable encoder groups train: "all", "bitfit" (biases and
    #   normalisation scales/shifts) or "lora" (low-rank updates of the frozen weights; medtl.models.adapters)

    @property
    def head_only(self) -> bool:
        return self.trainable == 0


def auto_candidates(cfg: TrainConfig, multi_label: bool = False) -> tuple[str, ...]:
    """The strategies ``auto`` tries (``train.auto_candidates``); single-label heads are left out for multi-label
    data."""
    return tuple(c for c in cfg.auto_candidates if not (multi_label and c in FEW_SHOT_HEADS))


def from_scratch(cfg: TrainConfig) -> TrainConfig:
    """Settings for training a randomly initialised network: every layer trained at the head's
    learning rate (no layer-wise decay) and BatchNorm statistics learnt (nothing to keep)."""
    return dataclasses.replace(cfg, strategy="full", encoder_lr_mult=1.0, layer_decay=1.0, freeze_bn=False)


def plan_stages(cfg: TrainConfig, n_groups: int, strategy: str | None = None, multi_label: bool = False) -> list[Stage]:
    """The stages of a strategy, for an encoder with ``n_groups`` layer groups.

    ``bitfit`` and ``lora`` train the head, then (after the head's warm-up) only the encoder's biases and
    normalisation parameters, or low-rank updates of its weights, at half the head's rate. ``lp_ft`` (Kumar
    et al. 2022) fits a linear probe to convergence first (the cross-validated logistic regression of
    ``logreg``; for multi-label data a head trained on cached features for ``max(frozen_epochs, 20)`` epochs),
    then fine-tunes everything from that head, with layer-wise decay."""
    strategy = strategy or cfg.strategy
    if strategy == "auto":
        raise ConfigError(None, "strategy 'auto' is resolved by fit(), which tries each of train.auto_candidates")
    enc_lr = cfg.lr * cfg.encoder_lr_mult
    head = [Stage("head", cfg.frozen_epochs, 0, cfg.lr, 0.0)] if cfg.frozen_epochs else []
    if strategy == "linear_probe":
        return [Stage("head", cfg.epochs, 0, cfg.lr, 0.0)]
    if strategy in FEW_SHOT_HEADS:  # fitted in closed form on cached features: one "epoch"
        return [Stage(strategy, 1, 0, cfg.lr, 0.0)]
    if strategy == "full":
        return [Stage("full", cfg.epochs, ALL, cfg.lr, enc_lr, cfg.layer_decay)]
    if strategy in ("bitfit", "lora"):
        return head + [Stage(strategy, cfg.epochs, ALL, cfg.lr / 2, cfg.lr / 2, 1.0, params=strategy)]
    if strategy == "lp_ft":
        probe = Stage("head", max(cfg.frozen_epochs, 20), 0, cfg.lr, 0.0) if multi_label else Stage("logreg", 1, 0, cfg.lr, 0.0)
        return [probe, Stage("fine_tune", cfg.epochs, ALL, cfg.lr / 2, enc_lr, cfg.layer_decay)]
    if strategy == "partial":
        return head + [Stage("partial", cfg.epochs, min(cfg.unfreeze_groups, n_groups), cfg.lr / 2, enc_lr,
                             cfg.layer_decay)]
    if strategy == "gradual":  # fastai/ULMFiT: one more group from the top every `gradual_epochs`
        stages, left = list(head), cfg.epochs
        for k in range(1, n_groups + 1):  # within train.epochs: the last stage takes what is left
            n = min(cfg.gradual_epochs, left) if k < n_groups else left
            if n <= 0:
                break
            stages.append(Stage(f"unfreeze_{k}", n, k if k < n_groups else ALL, cfg.lr / 2, enc_lr, cfg.layer_decay))
            left -= n
        return stages
    return head + [Stage("fine_tune", cfg.epochs, ALL, cfg.lr / 2, enc_lr, cfg.layer_decay)]


FEW_SHOT_HEADS = ("logreg", "ncm")  # heads fitted in closed form on cached features (train.strategy)
REFERENCE_BATCH = 8  # train.lr is the learning rate for batches of this size (the default batch_size)
AUTO_BATCHES = (256, 128, 64, 32, 16, 8)  # batch_size "auto" on a GPU: the largest that fits, in this order


def auto_batch_size(n_train: int, device: torch.device, fits: Callable[[int], bool], world: int = 1) -> tuple[int, str]:
    """``train.batch_size: auto``: (global batch size, the rule in words). On a CPU the reference batch
    of 8 (a CPU computes no faster per image in larger batches, and small data sets want more steps),
    rounded to a multiple of the ``world`` processes. On a GPU, ``world`` times the largest per-process
    batch ``b`` of :data:`AUTO_BATCHES` that leaves at least 8 steps per epoch and for which ``fits(b)``
    (a training step of ``b`` inputs runs without running out of memory), tried largest first."""
    if device.type != "cuda":
        b = max(1, round(REFERENCE_BATCH / world)) * world
        return b, f"{b} on a CPU (no faster per image in larger batches)"
    for b in AUTO_BATCHES:
        if b == REFERENCE_BATCH or (n_train // (b * world) >= 8 and fits(b)):
            each = f" ({b} in each of {world} processes)" if world > 1 else ""
            return b * world, (f"{b * world}{each}: the largest of {', '.join(map(str, AUTO_BATCHES))} with at least "
                               f"8 steps per epoch over {n_train} training inputs that fits in the GPU's memory")
    return REFERENCE_BATCH * world, ""


def scaled_lr(lr: float, batch_size: int) -> float:
    """``lr`` (set for batches of :data:`REFERENCE_BATCH`) at ``batch_size``: square-root scaling, the rule
    for Adam-family optimisers (Malladi et al. 2022; Granziol et al. 2022)."""
    return lr * math.sqrt(batch_size / REFERENCE_BATCH)


def _out_of_memory(e: BaseException) -> bool:
    """Whether an error is a device allocation failure (torch's own, or one raised by cuDNN/cuBLAS)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED",
                                                                    "CUBLAS_STATUS_ALLOC_FAILED")))


def resolve_batch(cfg: TrainConfig, model: torch.nn.Module, train_ds, device: torch.device,
                  runtime: Runtime | None = None, world: int = 1) -> tuple[TrainConfig, dict]:
    """``cfg`` with an integer batch size (``auto`` resolved by :func:`auto_batch_size`, the learning rate
    scaled by :func:`scaled_lr`), and the record saved with the run: batch size, learning rate, rule.
    The probe's steps draw no numbers from the seeded generators (they are forked)."""
    if cfg.batch_size != "auto":
        return cfg, {"batch_size": cfg.batch_size, "lr": cfg.lr, "rule": "set in the configuration"}
    runtime = runtime or Runtime(device)
    shape = tuple(train_ds[0]["image"].shape)

    def fits(b: int) -> bool:
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                measure_training_speed(model, shape, b, runtime, steps=1)
            return True
        except RuntimeError as e:  # (OutOfMemoryError is one)
            if not _out_of_memory(e):
                raise
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    b, rule = auto_batch_size(len(train_ds), device, fits, world)
    lr = scaled_lr(cfg.lr, b)
    if b != REFERENCE_BATCH:
        rule += f"; learning rate {cfg.lr:g} x sqrt({b}/{REFERENCE_BATCH}) = {lr:.3g}"
    return dataclasses.replace(cfg, batch_size=b, lr=lr), {"batch_size": b, "lr": lr, "rule": rule}


def loader_workers(setting: int | str, device: torch.device) -> int:
    """``train.workers``: processes preparing inputs (a data set's store, once; data sets that are not
    stores, every epoch). "auto": none on a CPU (they would take cores from the model), on a GPU one per
    spare core up to 8."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(0, min(8, usable_cores() - 1))


@dataclass
class FitResult:
    """What training produced besides the weights left in the model (those of the best epoch)."""

    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    best_score: float = -math.inf  # validation AUC (or -loss where AUC is undefined) of that epoch
    precision_choice: dict = field(default_factory=dict)  # how the precision was chosen (each candidate's images/s)
    strategy: str = ""  # strategy actually used
    strategy_reason: str = ""  # why (for "auto": the candidates' validation scores)
    candidates: dict = field(default_factory=dict)  # "auto": each candidate's validation score and seconds
    soup: dict = field(default_factory=dict)  # train.ensemble > 1: the members, the greedy soup and its cost
    train_images_per_s: float = 0.0  # throughput of the stages that trained the encoder
    world_size: int = 1  # processes that trained (torchrun)
    batch: dict = field(default_factory=dict)  # batch size and learning rate used, and the rule that chose them
    runtime: Runtime = field(default_factory=Runtime)  # device, precision, layout and flip averaging of training

    @property
    def precision(self) -> str:
        """The numeric precision training used."""
        return self.runtime.precision

    @property
    def batch_size(self) -> int:
        """The training batch size used (``auto`` resolved)."""
        return int(self.batch.get("batch_size", REFERENCE_BATCH))

    @property
    def device(self) -> str:
        return str(self.runtime.device)

    def eval_runtime(self) -> Runtime:
        """The runtime to evaluate the trained model with: its device, layout and flip averaging, at the
        precision of prediction (:func:`medtl.runtime.inference_precision`)."""
        return self.runtime.replace(precision=inference_precision(None))


# -- layer groups and freezing --------------------------------------------------------------------

def _train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Training mode; BatchNorm layers of frozen parts (or all, with ``freeze_bn``) keep their statistics."""
    model.train()
    for m in encoder_modules(model):
        if isinstance(m, _BatchNorm) and (freeze_bn or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def param_groups(model: torch.nn.Module, stage: Stage) -> list[dict]:
    """AdamW parameter groups of a stage: the head at its rate, each trainable encoder group at the rate
    of the one above times the stage's layer decay."""
    groups = [{"params": head_parameters(model), "lr": stage.head_lr}]
    enc = encoder_groups(model)
    k = len(enc) if stage.trainable == ALL else stage.trainable
    for depth, params in enumerate(reversed(enc[len(enc) - k:])):
        params = [p for p in params if p.requires_grad]  # (bitfit, lora: a selection of the group's parameters)
        if params:
            groups.append({"params": params, "lr": stage.encoder_lr * stage.layer_decay ** depth})
    return groups


def select_parameters(model: torch.nn.Module, stage: Stage, lora_rank: int = 8) -> None:
    """Within the encoder groups :func:`set_trainable` left trainable, train only the stage's ``params``:
    for "lora", LoRA updates are put on the encoder first (once; see :func:`medtl.models.adapters.add_lora`)."""
    if stage.params == "all":
        return
    if stage.params == "lora" and not any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        n = add_lora(model, lora_rank)
        log.info("LoRA rank %d on the encoder: %d trainable parameters", lora_rank, n)
    head = set(map(id, head_parameters(model)))
    for name, p in model.named_parameters():
        if id(p) in head or not p.requires_grad:
            continue
        p.requires_grad_(is_lora_parameter(name) if stage.params == "lora" else is_bitfit_parameter(model, name))


def _class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency weights (normalised to mean 1 over the examples); multi-label 0/1 rows: each
    finding's positive weight, negatives / positives (at most 100), for binary cross-entropy."""
    if labels.ndim == 2:
        pos = labels.sum(axis=0).astype(np.float64)
        return torch.tensor(np.clip((len(labels) - pos) / np.maximum(pos, 1), 0.01, 100.0), dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _multilabel_loss(logits, target, pos_weight, smoothing):
    """Binary cross-entropy per finding against 0/1 (or mixed) targets smoothed towards 1/2, positives
    weighted by ``pos_weight`` (a weight per finding, or None)."""
    target = target * (1 - smoothing) + smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


def _soft_cross_entropy(logits, target, weight, smoothing):
    """Cross-entropy against (mixed) soft targets, with class weights and label smoothing."""
    n = logits.shape[1]
    target = target * (1 - smoothing) + smoothing / n
    per_sample = -(target * logits.log_softmax(dim=1)).sum(dim=1)
    if weight is not None:
        w = target @ weight
        return (per_sample * w).sum() / w.sum()
    return per_sample.mean()


# -- the loop -------------------------------------------------------------------------------------

class _Trainer:
    """State shared by the stages of one :func:`fit` call."""

    def __init__(self, model, train_ds, val_ds, cfg: TrainConfig, num_classes: int, on_improve, unlabelled_ds=None):
        self.model, self.train_ds, self.val_ds, self.cfg = model, train_ds, val_ds, cfg
        self.num_classes, self.on_improve = num_classes, on_improve
        self.rank, self.world = distributed()
        self.device = local_device(resolve_device(cfg.device), self.world)
        self.runtime = Runtime(self.device, "fp32", cfg.channels_last, cfg.tta)
        self.runtime.prepare(model)
        self.workers = loader_workers(cfg.workers, self.device)
        if isinstance(train_ds, InputDataset):  # prepared now, not in the first epoch (nor in a prefetch thread),
            place_store(train_ds, self.device, self.workers)  # and on the GPU before its free memory is probed
        # rank 0 decides the batch size and the precision (probes per rank could differ by free memory or
        # timing noise) and tells the others
        batch = [resolve_batch(cfg, model, train_ds, self.device, self.runtime, self.world) if self.rank == 0
                 else None]
        if self.world > 1:
            dist.broadcast_object_list(batch, src=0)
        cfg, batch = batch[0]
        self.cfg = cfg
        choice = [choose_precision(cfg.precision, model, tuple(train_ds[0]["image"].shape),
                                   max(1, cfg.batch_size // self.world), self.runtime,
                                   model.pretrained_cfg.get("medtl_encoder", "")) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        choice = choice[0]
        self.runtime = self.runtime.replace(precision=choice.precision)
        self.log("precision %s (%s)%s", choice.precision, choice.reason, "".join(
            f"; {p} {v:.1f} img/s" for p, v in choice.img_per_s.items()))
        if cfg.batch_size % self.world:
            raise ConfigError(None, f"train.batch_size {cfg.batch_size} is not a multiple of the {self.world} "
                              "processes", "a global batch size divisible by the number of processes")
        labels = np.asarray([s["label"] for s in train_ds.data])
        self.multi_label = labels.ndim == 2  # several findings per input: a sigmoid and binary cross-entropy each
        self.weight = _class_weights(labels, num_classes).to(self.device) if cfg.class_weighting else None
        self.log("batch size %d, learning rate %.3g (%s)", batch["batch_size"], batch["lr"], batch["rule"])
        self.result = FitResult(precision_choice=choice.as_record(), world_size=self.world, runtime=self.runtime,
                                batch=batch)
        self.best_state = copy.deepcopy(plain_state_dict(model))
        self.best_val_loss = math.inf
        self.epoch, self.total_epochs, self.stale = 0, 0, 0  # stale: epochs without a better validation score
        self.rng = torch.Generator().manual_seed(cfg.seed + 7)  # mixup and cached-feature dropout
        # fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none)
        self.scaler = torch.amp.GradScaler(self.device.type) if choice.precision == "fp16" else None
        self._features = None
        self.prefetch = use_prefetch(self.device)
        transform = getattr(train_ds, "transform", None)
        self.augment = transform.batch_augment if isinstance(transform, TrainingTransform) else None
        self.encoder_images, self.encoder_seconds = 0, 0.0
        self.unlabelled = None  # semi-supervised: the unlabelled inputs' store, and their confident shares
        if unlabelled_ds is not None and len(unlabelled_ds):
            if self.augment is None:
                raise ConfigError(None, "semi-supervised training compares a weak and a strong augmentation of each "
                                  "unlabelled image, and data.augment is off", "data.augment: true")
            if self.world > 1:
                raise ConfigError(None, "semi-supervised training runs in one process (its extra forward passes "
                                  "are not synchronised across torchrun's)", "a run without torchrun")
            self.unlabelled = place_store(unlabelled_ds, self.device, self.workers)
            self.strong = self.augment.stronger(cfg.seed + 11)
            self.u_rng = torch.Generator().manual_seed(cfg.seed + 13)
            self.u_confident: list[float] = []
            self.log("semi-supervised: %d unlabelled inputs, consistency weight %g, confidence %g",
                     len(unlabelled_ds), cfg.unlabelled_weight, cfg.pseudo_threshold)

    def loader(self) -> tuple[Callable[[int], Iterable], int]:
        """(epoch -> this process's batches of the training set on the device, in a fresh seeded order;
        steps per epoch). Inputs come from the data set's store (prepared once, normalised per batch on
        the device); the order is DistributedSampler's, so each process under torchrun reads its share."""
        sampler = DistributedSampler(self.train_ds, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.cfg.seed, drop_last=self.world > 1)
        per_rank = self.cfg.batch_size // self.world
        drop_last = len(self.train_ds) > self.cfg.batch_size
        n = len(sampler)
        steps = n // per_rank if drop_last and n >= per_rank else -(-n // per_rank)

        def epoch(k: int) -> Iterable:
            sampler.set_epoch(k)
            return iterate_batches(self.train_ds, per_rank, self.device, list(sampler), drop_last, self.workers)

        return epoch, steps

    def schedule(self, optimizer, steps_per_epoch: int, epochs: int):
        steps = max(1, epochs * steps_per_epoch)
        warmup = max(1, int(self.cfg.warmup_epochs * steps_per_epoch))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / steps))))

    def loss(self, logits, y):
        if self.multi_label:
            return _multilabel_loss(logits.float(), y.float(), self.weight, self.cfg.label_smoothing)
        target = F.one_hot(y, self.num_classes).float() if y.ndim == 1 else y
        return _soft_cross_entropy(logits.float(), target, self.weight, self.cfg.label_smoothing)

    def mix(self, x, y):
        target = y.float() if self.multi_label else F.one_hot(y, self.num_classes).float()
        if self.cfg.mixup <= 0:
            return x, target
        lam = float(torch.distributions.Beta(self.cfg.mixup, self.cfg.mixup).sample())
        perm = torch.randperm(x.shape[0], generator=self.rng).to(x.device)
        return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]

    def run_stage(self, stage: Stage) -> None:
        """The stage's epochs over the training set (the encoder's trainable groups with the head)."""
        cfg, model = self.cfg, self.model
        set_trainable(model, stage.trainable)
        select_parameters(model, stage, cfg.lora_rank)
        if stage.name in FEW_SHOT_HEADS:
            return self.fit_few_shot_head(stage)
        if stage.head_only and cfg.cache_features:
            return self.run_head_on_features(stage)
        net = model
        if self.world > 1:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None)
        if cfg.compile and not stage.head_only:
            net = torch.compile(net)
        optimizer = torch.optim.AdamW(param_groups(model, stage), weight_decay=cfg.weight_decay)
        epoch_batches, steps = self.loader()
        if self.unlabelled is not None:  # an epoch sweeps the unlabelled pool once; the labelled set is cycled
            epoch_batches, steps = cycled(epoch_batches, steps, max(steps, len(self.unlabelled.images) // cfg.batch_size))

        def batches():
            loader = epoch_batches(self.epoch)
            return _progress(prefetch(loader, device=self.device) if self.prefetch else loader, self.rank,
                             f"epoch {self.epoch}/{self.total_epochs}", steps)

        def step(batch):
            x = batch["image"]
            if self.augment is not None:  # whole-batch augmentation on the device, outside autocast
                x = self.augment(x)
            x, target = self.mix(self.runtime.to_input(x), batch["label"])
            with self.runtime.autocast():
                logits = net(x)
            loss = self.loss(logits, target)
            if self.unlabelled is not None:
                loss = loss + cfg.unlabelled_weight * self.consistency_loss(net)
            return loss

        def validate():
            return predict_logits(model, self.val_ds, self.runtime, max(32, cfg.batch_size)).study_probs()

        self.run_epochs(stage, optimizer, steps, batches, step, validate,
                        lambda: _train_mode(model, cfg.freeze_bn))

    def consistency_loss(self, net) -> torch.Tensor:
        """FixMatch's unlabelled loss (Sohn et al. 2020): a batch of unlabelled inputs, a weak and a strong
        augmentation of each; where the model's answer on the weak view is confident (its probability at least
        ``train.pseudo_threshold``; multi-label: per finding, that far from 1/2 either way), that answer is the
        target of the strong view. Averaged over the whole batch (unconfident answers count as 0)."""
        idx = torch.randint(0, len(self.unlabelled.images), (self.cfg.batch_size,), generator=self.u_rng)
        xu = self.unlabelled.batch(idx, self.device)["image"]
        weak, strong = self.runtime.to_input(self.augment(xu)), self.runtime.to_input(self.strong(xu))
        tau = self.cfg.pseudo_threshold
        with torch.no_grad(), self.runtime.autocast():
            zw = net(weak).float()
        with self.runtime.autocast():
            zs = net(strong).float()
        if self.multi_label:
            p = zw.sigmoid()
            mask = ((p >= tau) | (p <= 1 - tau)).float()
            per = F.binary_cross_entropy_with_logits(zs, (p >= 0.5).float(), reduction="none")
        else:
            conf, pseudo = zw.softmax(dim=1).max(dim=1)
            mask = (conf >= tau).float()
            per = F.cross_entropy(zs, pseudo, reduction="none")
        self.u_confident.append(float(mask.mean()))
        return (per * mask).mean()

    def cached_features(self):
        """((train features, labels), (validation features, labels)) of the frozen encoder, extracted once."""
        cfg, model = self.cfg, self.model
        if self._features is None:
            t0 = time.perf_counter()
            bs, rt = max(32, cfg.batch_size), self.runtime
            self._features = (extract_features(model, self.train_ds, rt, bs), extract_features(model, self.val_ds, rt, bs))
            self.log("encoder features cached for %d + %d inputs in %.1fs", len(self._features[0][0]),
                     len(self._features[1][0]), time.perf_counter() - t0)
        return self._features

    def validate_head(self, head, vf, vy) -> tuple[np.ndarray, np.ndarray]:
        head.eval()
        with torch.no_grad():
            logits = head(vf).float().cpu().numpy()
        return Logits(vy.cpu().numpy(), logits, study_index(self.val_ds), self.val_ds.aggregation).study_probs()

    def fit_few_shot_head(self, stage: Stage) -> None:
        """The head fitted in closed form on the frozen encoder's features (no augmentation):
        ``logreg``, an L2-regularised logistic regression whose strength is chosen by stratified
        cross-validation on the training features (log loss; class-balanced); ``ncm``, the nearest class
        mean (Euclidean), which is linear in the features: logit_c = f·m_c - |m_c|^2 / 2."""
        t0 = time.perf_counter()
        (xf, yf), (vf, vy) = self.cached_features()
        head = self.model.get_classifier()
        x, y = xf.float().cpu().numpy(), yf.cpu().numpy()
        if stage.name == "ncm":
            means = np.stack([x[y == c].mean(0) if (y == c).any() else np.zeros(x.shape[1]) for c in
                              range(self.num_classes)])
            weight, bias = means, -0.5 * (means ** 2).sum(1)
            detail = "class means"
        else:
            from sklearn.linear_model import LogisticRegressionCV

            folds = int(max(2, min(5, np.bincount(y, minlength=self.num_classes).min())))
            # centred, and scaled by one number for all features: a per-feature standardisation would blow up
            # the features that barely vary in a few dozen images (and vary in new ones)
            mean, scale = x.mean(0), float(x.std(0).mean()) or 1.0
            clf = LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=folds, scoring="neg_log_loss", max_iter=2000,
                                       class_weight="balanced" if self.cfg.class_weighting else None)
            from sklearn.exceptions import ConvergenceWarning

            # scikit-learn's notices of its coming defaults, and of the weakest regularisations of the grid not
            # converging (cross-validation judges those by their score like the others)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit((x - mean) / scale, y)
            coef = clf.coef_ / scale  # the centring and scaling folded into the head
            intercept = clf.intercept_ - (coef * mean).sum(1)
            if coef.shape[0] == 1:  # binary: one decision function, split symmetrically over the two logits
                coef, intercept = np.stack([-coef[0], coef[0]]) / 2, np.array([-intercept[0], intercept[0]]) / 2
            weight, bias = coef, intercept
            detail = f"C={float(clf.C_[0]):.3g} chosen by {folds}-fold cross-validation"
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
        self.epoch += 1
        self.log("%s head: %s", stage.name, detail)
        self.end_epoch(stage, [], time.perf_counter() - t0, self.validate_head(head, vf, vy))

    def run_head_on_features(self, stage: Stage) -> None:
        """A head-only stage on features extracted once from the (frozen) encoder."""
        cfg, model = self.cfg, self.model
        (xf, yf), (vf, vy) = self.cached_features()
        head = model.get_classifier()
        drop = float(getattr(model, "drop_rate", 0.0) or 0.0)
        optimizer = torch.optim.AdamW(head.parameters(), lr=stage.head_lr, weight_decay=cfg.weight_decay)
        n, bs = len(xf), cfg.batch_size

        def step(idx):
            f, target = self.mix(xf[idx], yf[idx])
            return self.loss(head(F.dropout(f, drop, training=True)), target)

        def validate():
            return self.validate_head(head, vf, vy)

        self.run_epochs(stage, optimizer, n // bs if n > bs else 1,
                        lambda: feature_batches(n, bs, self.rng, xf.device), step, validate, head.train)

    def run_epochs(self, stage: Stage, optimizer, steps_per_epoch: int, batches: Callable[[], Iterable],
                   step: Callable[[Any], torch.Tensor], validate: Callable[[], tuple], train_mode: Callable) -> None:
        """The epoch skeleton every stage shares: warm-up + cosine schedule, :func:`train_epoch` over
        ``batches()`` with ``step`` (a batch to its loss), the divergence check, validation, early stopping
        and the best-epoch checkpoint. Encoder stages' throughput is recorded."""
        schedule = self.schedule(optimizer, steps_per_epoch, stage.epochs)
        self.stale = 0
        for _ in range(stage.epochs):
            self.epoch += 1
            t0 = time.perf_counter()
            train_mode()
            losses = train_epoch(batches(), step, optimizer, schedule, self.scaler,
                                 on_loss=lambda losses: self.check_loss(stage, losses),
                                 sync_every=loss_sync_steps(self.device))
            seconds = time.perf_counter() - t0
            if not stage.head_only:
                self.encoder_images += len(losses) * self.cfg.batch_size
                self.encoder_seconds += seconds
            if self.end_epoch(stage, losses, seconds, validate()):
                break

    def end_epoch(self, stage: Stage, losses, seconds, val: tuple[np.ndarray, np.ndarray]) -> bool:
        """Record the epoch and its validation (labels, probabilities); keep the weights if they are the best
        so far; True: stop the stage."""
        cfg = self.cfg
        y_val, p_val = val
        if not np.all(np.isfinite(p_val)):
            self.diverged(stage, "non-finite validation outputs")
        val_loss = validation_loss(y_val, p_val)
        val_auc = compute_auc(y_val, p_val)
        score = val_auc if val_auc is not None else -val_loss
        row = {"epoch": self.epoch, "stage": stage.name, "train_loss": float(np.mean(losses)) if losses else None,
               "val_loss": val_loss, "val_auc": val_auc, "seconds": round(seconds, 3)}
        if self.unlabelled is not None:  # the share of unlabelled answers confident enough to train on
            row["pseudo_confident"] = round(float(np.mean(self.u_confident)), 4) if self.u_confident else None
            self.u_confident = []
        self.result.history.append(row)
        # a tie in AUC (frequent on small validation sets) goes to the lower loss: the epoch whose probabilities
        # have not collapsed to one side
        improved = score > self.result.best_score + 1e-9 or (
            abs(score - self.result.best_score) <= 1e-9 and val_loss < self.best_val_loss)
        if improved:
            self.result.best_score, self.result.best_epoch = score, self.epoch
            self.best_val_loss = val_loss
            self.best_state = copy.deepcopy(plain_state_dict(self.model))
            if self.on_improve is not None and self.rank == 0:
                self.on_improve(self.model, row)
        self.log("epoch %d/%d [%s] train loss %.4f  val loss %.4f  val AUC %s  %.1fs%s", self.epoch,
                 self.total_epochs, stage.name, row["train_loss"] or float("nan"), val_loss,
                 f"{val_auc:.3f}" if val_auc is not None else "n/a", seconds, "  *" if improved else "")
        self.stale = 0 if improved else self.stale + 1
        if self.stale >= cfg.patience:
            self.log("stage %s stopped early: no better validation score for %d epochs", stage.name, self.stale)
            return True
        return False

    def check_loss(self, stage: Stage, losses: list[float]) -> bool:
        """A NaN or infinite step loss stops training (TrainingDivergedError)."""
        if not math.isfinite(losses[-1]):
            self.diverged(stage, f"training loss {losses[-1]} at step {len(losses)}")
        return False

    def diverged(self, stage: Stage, what: str) -> None:
        raise TrainingDivergedError(
            f"training diverged in epoch {self.epoch} ({stage.name} stage): {what}; lower train.lr "
            f"(now {self.cfg.lr:g}), or for a network trained from scratch in small batches use GroupNorm "
            "(e.g. the *_3d_gn encoders)")

    def log(self, *args):
        if self.rank == 0:
            log.info(*args)


def train_epoch(batches: Iterable, step: Callable[[Any], torch.Tensor], optimizer: torch.optim.Optimizer,
                schedule=None, scaler: torch.amp.GradScaler | None = None,
                on_loss: Callable[[list[float]], bool] | None = None, sync_every: int = 1) -> list[float]:
    """One pass of the training loop: for each batch, ``step(batch)`` gives the loss; backward, optimizer
    step (through ``scaler`` for fp16), then ``schedule`` steps. ``on_loss(losses so far)`` returning True
    ends the pass early. Every stage of :func:`fit` and the learning-rate finder run through here.

    Reading a loss waits for the device to finish the step. With ``sync_every`` > 1 the losses are read
    every that many steps (on a GPU the next steps are queued meanwhile): ``on_loss`` then sees each loss
    as before, up to ``sync_every - 1`` steps late."""
    losses: list[float] = []
    pending: list[torch.Tensor] = []

    def flush() -> bool:
        values = torch.stack(pending).float().tolist() if pending else []
        pending.clear()
        for v in values:
            losses.append(v)
            if on_loss is not None and on_loss(losses):
                return True
        return False

    for batch in batches:
        loss = step(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if schedule is not None:
            schedule.step()
        pending.append(loss.detach())
        if len(pending) >= sync_every and flush():
            return losses
    flush()
    return losses


def cycled(epoch_batches: Callable[[int], Iterable], steps: int, total: int) -> tuple[Callable[[int], Iterable], int]:
    """(epoch -> ``total`` batches, ``total``): an epoch of ``total`` steps made of successive passes over the
    ``steps`` batches of ``epoch_batches`` (each pass in its own seeded order)."""
    if total <= steps:
        return epoch_batches, steps

    def epoch(k: int) -> Iterator:
        n, p = 0, 0
        while n < total:
            for batch in epoch_batches(k * 1009 + p):
                yield batch
                n += 1
                if n >= total:
                    return
            p += 1

    return epoch, total


def loss_sync_steps(device: torch.device) -> int:
    """Steps between reads of the training loss: every step on a CPU (nothing to overlap), every 16 on a GPU
    (a read per step would leave the GPU idle while Python queues the next step)."""
    return 1 if device.type == "cpu" else 16


def feature_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device | None = None):
    """Index batches over ``n`` cached feature rows in a fresh random order (one epoch; ``n`` < batch size: one)."""
    order = torch.randperm(n, generator=generator).to(device)
    steps = n // batch_size if n > batch_size else 1
    return (order[s * batch_size:(s + 1) * batch_size] for s in range(steps))


def use_prefetch(device: torch.device) -> bool:
    """Prepare batches in a background thread? On a GPU yes: it computes apart from the CPU, which can
    then read the next batch. On a CPU no: both would share the same cores (measured on 2 cores:
    8 % slower with the thread)."""
    return device.type != "cpu"


def prefetch(batches: Iterable, depth: int = 2, device: torch.device | None = None) -> Iterator:
    """Iterate ``batches`` with the next ``depth`` ones prepared in a background thread, so reading and
    collating a batch overlaps the model's step on the previous one (torch and numpy release the GIL).
    An error raised while preparing a batch is raised here, in order. On a GPU ``device`` is made the
    thread's current device (each process of a torchrun job has its own)."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for item in batches:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            slots.put(e)

    thread = threading.Thread(target=work, name="medtl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _progress(loader, rank: int, desc: str, total: int | None = None):
    """A tqdm bar on an interactive terminal (rank 0 only); the plain loader otherwise."""
    if rank != 0 or not sys.stderr.isatty():
        return loader
    from tqdm.auto import tqdm  # optional: a progress bar only on an interactive terminal

    return tqdm(loader, desc=desc, leave=False, unit="batch", total=total)


def fit(model: torch.nn.Module, train_ds, val_ds, cfg: TrainConfig, num_classes: int,
        on_improve: Callable | None = None, unlabelled_ds=None) -> FitResult:
    """Train ``model`` through the stages of its strategy; keep the best validation epoch.

    Validation AUC (or, where undefined, minus validation loss) picks the epoch whose weights
    are restored at the end; ``on_improve(model, row)`` is called at each new best (to write a
    checkpoint, so an interrupted run keeps its last good weights). Every stage restarts AdamW
    with warm-up + cosine decay. ``unlabelled_ds`` (a data set of unlabelled inputs) adds FixMatch's
    consistency loss to the stages that train the encoder (:meth:`_Trainer.consistency_loss`).
    """
    if cfg.ensemble > 1:
        return _fit_soup(model, train_ds, val_ds, cfg, num_classes, on_improve, unlabelled_ds)
    if cfg.strategy == "auto":
        return _fit_auto(model, train_ds, val_ds, cfg, num_classes, on_improve, unlabelled_ds)
    set_determinism(seed=cfg.seed)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    if hasattr(train_ds, "transform") and hasattr(train_ds.transform, "set_random_state"):
        train_ds.transform.set_random_state(seed=cfg.seed)
    trainer = _Trainer(model, train_ds, val_ds, cfg, num_classes, on_improve, unlabelled_ds)
    strategy = cfg.strategy
    if trainer.multi_label and strategy in FEW_SHOT_HEADS:
        raise ConfigError(None, f"train.strategy {strategy!r} fits a single-label head",
                          "linear_probe, partial, fine_tune, gradual, full, bitfit, lora or lp_ft for a multi-label "
                          "data set")
    trainer.result.strategy, trainer.result.strategy_reason = strategy, "set in the configuration"
    trainer.log("strategy %s", strategy)
    stages = [s for s in plan_stages(trainer.cfg, len(encoder_groups(model)), strategy, trainer.multi_label)
              if s.epochs > 0]
    trainer.total_epochs = sum(s.epochs for s in stages)
    try:
        for stage in stages:
            trainer.run_stage(stage)
    finally:
        merge_lora(model)  # the plain network again (the best state is kept in its form)
    model.load_state_dict(trainer.best_state)
    set_trainable(model, ALL)
    model.eval()
    result = trainer.result
    if trainer.encoder_seconds:
        result.train_images_per_s = trainer.encoder_images / trainer.encoder_seconds
    return result


def _fit_auto(model: torch.nn.Module, train_ds, val_ds, cfg: TrainConfig, num_classes: int,
              on_improve: Callable | None, unlabelled_ds=None) -> FitResult:
    """``strategy: auto``: train each of :func:`auto_candidates` from the same starting weights and seed, and keep
    the one with the best validation score (AUC; the cheaper candidate, earlier in the list, on a tie). The
    candidates' scores and seconds are in the result (``candidates``) and in its reason; their epochs are in the
    history, each stage named ``candidate:stage``. The test split is never seen."""
    multi = np.asarray([s["label"] for s in train_ds.data]).ndim == 2
    candidates = auto_candidates(cfg, multi)
    if not candidates:
        raise ConfigError(None, "train.auto_candidates leaves no strategy to try for this data",
                          "strategies such as linear_probe, partial, fine_tune")
    start = copy.deepcopy(plain_state_dict(model))
    best, history, scores = None, [], {}
    for name in candidates:
        model.load_state_dict(start)
        t0 = time.perf_counter()
        result = fit(model, train_ds, val_ds, dataclasses.replace(cfg, strategy=name), num_classes,
                     unlabelled_ds=unlabelled_ds)
        seconds = time.perf_counter() - t0
        scores[name] = {"val_score": round(float(result.best_score), 4), "seconds": round(seconds, 1),
                        "best_epoch": result.best_epoch}
        history += [{**row, "stage": f"{name}:{row['stage']}"} for row in result.history]
        log.info("auto: candidate %s scored %.4f on validation in %.1fs", name, result.best_score, seconds)
        if best is None or result.best_score > best[1].best_score + 1e-9:
            best = (name, result, copy.deepcopy(plain_state_dict(model)))
    name, result, state = best
    model.load_state_dict(state)
    model.eval()
    if on_improve is not None and distributed()[0] == 0:
        on_improve(model, result.history[result.best_epoch - 1] if result.history else {})
    result.history = history
    result.strategy = name
    result.candidates = scores
    result.strategy_reason = ("chosen on validation among " + ", ".join(
        f"{c} {v['val_score']:.3f} ({v['seconds']:.0f} s)" for c, v in scores.items()) +
        f"; {sum(v['seconds'] for v in scores.values()):.0f} s in all")
    log.info("auto: %s (%s)", name, result.strategy_reason)
    return result


def _average(states: list[dict]) -> dict:
    """The mean of state dicts (integer tensors, such as BatchNorm's batch counters, from the first)."""
    out = {}
    for k, v in states[0].items():
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
    return out


def validation_score(model: torch.nn.Module, val_ds, runtime: Runtime, batch_size: int = 32) -> float:
    """What training keeps epochs by: the validation AUC per study, or minus the validation loss where the AUC is
    undefined."""
    y, p = predict_logits(model, val_ds, runtime, batch_size).study_probs()
    auc = compute_auc(y, p)
    return auc if auc is not None else -validation_loss(y, p)


def validation_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """The negative log-likelihood of validation labels under the probabilities (multi-label: binary
    cross-entropy per finding)."""
    if labels.ndim == 2:
        return float(F.binary_cross_entropy(torch.from_numpy(probs).float().clamp(1e-7, 1 - 1e-7),
                                            torch.from_numpy(labels).float()))
    return float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)), torch.from_numpy(labels).long()))


def _fit_soup(model: torch.nn.Module, train_ds, val_ds, cfg: TrainConfig, num_classes: int,
              on_improve: Callable | None, unlabelled_ds=None) -> FitResult:
    """``train.ensemble`` = n > 1: n trainings from the same starting weights with seeds ``seed`` .. ``seed + n - 1``,
    combined into one network by a greedy weight-space soup (Wortsman et al. 2022): members in order of their
    validation score, each one averaged in only where the average scores at least as well on validation. The
    result is one network (prediction costs what one model costs; training costs n). The members' scores, the
    soup's, and the score of averaging the members' outputs instead (an output ensemble, n times the prediction
    cost) are in ``result.soup``."""
    start = copy.deepcopy(plain_state_dict(model))
    members, history, t_all = [], [], time.perf_counter()
    for k in range(cfg.ensemble):
        model.load_state_dict(start)
        seed = cfg.seed + k
        result = fit(model, train_ds, val_ds, dataclasses.replace(cfg, seed=seed, ensemble=1), num_classes,
                     unlabelled_ds=unlabelled_ds)
        members.append((seed, result, copy.deepcopy(plain_state_dict(model))))
        history += [{**row, "stage": f"seed{seed}:{row['stage']}"} for row in result.history]
        log.info("ensemble: member seed %d scored %.4f on validation", seed, result.best_score)
    runtime = members[0][1].eval_runtime()
    bs = max(32, members[0][1].batch_size)
    order = sorted(range(len(members)), key=lambda i: -members[i][1].best_score)
    soup = [order[0]]
    model.load_state_dict(members[order[0]][2])
    best = validation_score(model, val_ds, runtime, bs)
    tried = [{"seeds": [members[order[0]][0]], "val_score": round(best, 4), "kept": True}]
    for i in order[1:]:
        model.load_state_dict(_average([members[j][2] for j in soup + [i]]))
        score = validation_score(model, val_ds, runtime, bs)
        kept = score >= best - 1e-9
        tried.append({"seeds": [members[j][0] for j in soup + [i]], "val_score": round(score, 4), "kept": kept})
        if kept:
            soup.append(i)
            best = score
    model.load_state_dict(_average([members[j][2] for j in soup]))
    # for the record: averaging the members' probabilities instead of their weights
    probs = []
    for _, _, state in members:
        ref = copy.deepcopy(model)
        ref.load_state_dict(state)
        probs.append(predict_logits(ref, val_ds, runtime, bs).study_probs())
    output_auc = compute_auc(probs[0][0], np.mean([p for _, p in probs], axis=0))
    model.eval()
    result = members[order[0]][1]
    result.history, result.best_score = history, best
    result.soup = {"members": [{"seed": seed, "val_score": round(float(r.best_score), 4)} for seed, r, _ in members],
                   "ingredients": [members[j][0] for j in soup], "greedy_steps": tried, "soup_val_score": round(best, 4),
                   "output_ensemble_val_score": None if output_auc is None else round(output_auc, 4),
                   "training_seconds": round(time.perf_counter() - t_all, 1),
                   "cost": f"{len(members)} trainings; prediction costs one model"}
    log.info("ensemble: soup of seeds %s scores %.4f on validation (best member %.4f, output ensemble %s)",
             result.soup["ingredients"], best, members[order[0]][1].best_score, result.soup["output_ensemble_val_score"])
    if on_improve is not None and distributed()[0] == 0:
        on_improve(model, {})
    return result


__all__ = ["auto_batch_size", "scaled_lr", "resolve_batch", "loader_workers", "REFERENCE_BATCH", "Stage", "plan_stages", "from_scratch", "auto_candidates", "validation_score", "fit", "FitResult", "param_groups", "prefetch",
           "use_prefetch", "train_epoch", "loss_sync_steps", "feature_batches", "ALL"]
