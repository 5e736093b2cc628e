"""The training loop: a :class:`Trainer` runs the stages of one strategy over a model, keeps the best
validation epoch, and records what happened in a :class:`FitResult`.

Every stage shares one epoch skeleton (:meth:`Trainer.run_epochs`): warm-up + cosine schedule, the steps of
:func:`medtl.train.loop.train_epoch`, the divergence check, validation, early stopping and the best-epoch
checkpoint. What is minimised comes from :mod:`medtl.train.objectives`; head-only stages train on encoder
features extracted once (``cache_features``), which turns a linear probe into seconds of work. Under
``torchrun`` the same loop runs data-parallel (DistributedDataParallel, gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from medtl.config import TrainConfig
from medtl.data.dataset import InputDataset, iterate_batches, place_store, study_index
from medtl.errors import ConfigError, TrainingDivergedError
from medtl.metrics import compute_auc
from medtl.models.groups import set_trainable
from medtl.models.peft import plain_state_dict
from medtl.options import FEW_SHOT_HEADS
from medtl.predict.forward import predict_logits
from medtl.predict.post import Logits
from medtl.progress import format_seconds
from medtl.runtime import (
    Runtime,
    adamw,
    choose_precision,
    distributed,
    inference_precision,
    local_device,
    resolve_device,
)
from medtl.threads import fit_threads
from medtl.train.batching import REFERENCE_BATCH, loader_workers, resolve_batch
from medtl.train.checkpoint import restore_model, resume_within_stage
from medtl.train.feature_cache import cached_features
from medtl.train.heads import fit_head
from medtl.train.loop import cycled, feature_batches, loss_sync_steps, prefetch, progress, train_epoch, use_prefetch
from medtl.train.objectives import FixMatch, Mixup, create_objective
from medtl.train.stages import Stage, param_groups, select_parameters, train_mode
from medtl.transforms import TrainingTransform

log = logging.getLogger("medtl.train")


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


class Trainer:
    """State shared by the stages of one :func:`medtl.train.fit` call."""

    def __init__(
        self, model, train_ds, val_ds, cfg: TrainConfig, num_classes: int, on_improve, unlabelled_ds=None, monitor=None
    ):
        self.model, self.train_ds, self.val_ds = model, train_ds, val_ds
        self.num_classes, self.on_improve = num_classes, on_improve
        # monitor: follows the run (checkpoints, status, TensorBoard; medtl.train.tracking.RunMonitor) and holds the
        # checkpoint to resume from
        self.monitor = monitor
        self.resume = monitor.resume if monitor is not None else None
        self.resume_path = monitor.checkpoint_path if monitor is not None else None
        self.stages: list[Stage] = []  # the strategy's stages (run_strategy), where the run stands in them,
        self.stage_index, self.stage_epoch, self.optimizer = 0, 0, None  # and the running stage's optimiser
        self.rank, self.world = distributed()
        self.device = local_device(resolve_device(cfg.device), self.world)
        self.runtime = Runtime(self.device, "fp32", cfg.channels_last, cfg.tta)
        self.runtime.prepare(model)
        self.workers = loader_workers(cfg.workers, self.device)
        if isinstance(train_ds, InputDataset):  # prepared now, not in the first epoch (nor in a prefetch thread),
            place_store(train_ds, self.device, self.workers)  # and on the GPU before its free memory is probed
        self.cfg, batch, choice = self.resolve(cfg)
        labels = np.asarray([s["label"] for s in train_ds.data])
        self.multi_label = labels.ndim == 2  # several findings per input: a sigmoid and binary cross-entropy each
        self.objective = create_objective(labels, num_classes, self.cfg, self.device)
        self.log("batch size %d, learning rate %.3g (%s)", batch["batch_size"], batch["lr"], batch["rule"])
        self.result = FitResult(
            precision_choice=choice.as_record(), world_size=self.world, runtime=self.runtime, batch=batch
        )
        self.best_state = copy.deepcopy(plain_state_dict(model))
        self.best_val_loss = math.inf
        self.epoch, self.total_epochs, self.stale = 0, 0, 0  # stale: epochs without a better validation score
        self.rng = torch.Generator().manual_seed(self.cfg.seed + 7)  # mixup and cached-feature batches
        self.mixup = Mixup(self.cfg.mixup, self.rng)
        # fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none)
        self.scaler = torch.amp.GradScaler(self.device.type) if choice.precision == "fp16" else None
        self._features = None
        self.prefetch = use_prefetch(self.device)
        transform = getattr(train_ds, "transform", None)
        self.augment = transform.batch_augment if isinstance(transform, TrainingTransform) else None
        self.encoder_images, self.encoder_seconds = 0, 0.0
        self.fixmatch = self.semi_supervised(unlabelled_ds)

    def resolve(self, cfg: TrainConfig):
        """(``cfg`` with its batch size resolved, the batch record, the precision chosen): rank 0 decides (probes
        per rank could differ by free memory or timing noise) and tells the others."""
        batch = [
            resolve_batch(cfg, self.model, self.train_ds, self.device, self.runtime, self.world)
            if self.rank == 0
            else None
        ]
        if self.world > 1:
            dist.broadcast_object_list(batch, src=0)
        cfg, record = batch[0]
        choice = [
            choose_precision(
                cfg.precision,
                self.model,
                tuple(self.train_ds[0]["image"].shape),
                max(1, cfg.batch_size // self.world),
                self.runtime,
                self.model.pretrained_cfg.get("medtl_encoder", ""),
                frozen_bn=cfg.freeze_bn,
            )
            if self.rank == 0
            else None
        ]
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        choice = choice[0]
        self.runtime = self.runtime.replace(precision=choice.precision)
        self.log(
            "precision %s (%s)%s",
            choice.precision,
            choice.reason,
            "".join(f"; {p} {v:.1f} img/s" for p, v in choice.img_per_s.items()),
        )
        if cfg.batch_size % self.world:
            raise ConfigError(
                None,
                f"train.batch_size {cfg.batch_size} is not a multiple of the {self.world} processes",
                "a global batch size divisible by the number of processes",
            )
        return cfg, record, choice

    def semi_supervised(self, unlabelled_ds) -> FixMatch | None:
        """FixMatch's consistency loss over ``unlabelled_ds`` (None without unlabelled inputs)."""
        if unlabelled_ds is None or not len(unlabelled_ds):
            return None
        if self.augment is None:
            raise ConfigError(
                None,
                "semi-supervised training compares a weak and a strong augmentation of each "
                "unlabelled image, and data.augment is off",
                "data.augment: true",
            )
        if self.world > 1:
            raise ConfigError(
                None,
                "semi-supervised training runs in one process (its extra forward passes "
                "are not synchronised across torchrun's)",
                "a run without torchrun",
            )
        cfg = self.cfg
        store = place_store(unlabelled_ds, self.device, self.workers)
        self.log(
            "semi-supervised: %d unlabelled inputs, consistency weight %g, confidence %g",
            len(unlabelled_ds),
            cfg.unlabelled_weight,
            cfg.pseudo_threshold,
        )
        return FixMatch(
            store,
            self.augment,
            self.augment.stronger(cfg.seed + 11),
            cfg.pseudo_threshold,
            cfg.unlabelled_weight,
            self.multi_label,
            cfg.batch_size,
            torch.Generator().manual_seed(cfg.seed + 13),
        )

    def loader(self) -> tuple[Callable[[int], Iterable], int]:
        """(epoch -> this process's batches of the training set on the device, in a fresh seeded order;
        steps per epoch). Inputs come from the data set's store (prepared once, normalised per batch on
        the device); the order is DistributedSampler's, so each process under torchrun reads its share."""
        sampler = DistributedSampler(
            self.train_ds,
            num_replicas=self.world,
            rank=self.rank,
            shuffle=True,
            seed=self.cfg.seed,
            drop_last=self.world > 1,
        )
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
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
        )

    def run_stage(self, stage: Stage) -> None:
        """The stage's epochs over the training set (the encoder's trainable groups with the head)."""
        cfg, model = self.cfg, self.model
        set_trainable(model, stage.trainable)
        select_parameters(model, stage, cfg.lora_rank)
        if self.resume is not None and self.resume["stage"] == self.stage_index:  # within this stage: its weights
            restore_model(model, self.resume, self.resume_path)  # (after its set-up, which may add LoRA adapters)
        self.stage_epoch, self.optimizer = 0, None
        if stage.name in FEW_SHOT_HEADS:
            return self.fit_few_shot_head(stage)
        if stage.head_only and cfg.cache_features:
            return self.run_head_on_features(stage)
        net = model
        if self.world > 1:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile and not stage.head_only:
            net = torch.compile(net)
        optimizer = adamw(param_groups(model, stage), self.device, weight_decay=cfg.weight_decay)
        epoch_batches, steps = self.loader()
        if self.fixmatch is not None:  # an epoch sweeps the unlabelled pool once; the labelled set is cycled
            epoch_batches, steps = cycled(epoch_batches, steps, max(steps, len(self.fixmatch) // cfg.batch_size))

        def batches():
            loader = epoch_batches(self.epoch)
            return progress(
                prefetch(loader, device=self.device) if self.prefetch else loader,
                self.rank,
                f"epoch {self.epoch}/{self.total_epochs}",
                steps,
            )

        def step(batch):
            x = batch["image"]
            if self.augment is not None:  # whole-batch augmentation on the device, outside autocast
                x = self.augment(x)
            x, target = self.mixup(self.runtime.to_input(x), self.objective.targets(batch["label"]))
            with self.runtime.autocast():
                logits = net(x)
            loss = self.objective(logits, target)
            if self.fixmatch is not None:
                loss = loss + self.fixmatch(net, self.runtime, self.device)
            return loss

        def validate():
            return predict_logits(model, self.val_ds, self.runtime, max(32, cfg.batch_size)).study_probs()

        self.run_epochs(stage, optimizer, steps, batches, step, validate, lambda: train_mode(model, cfg.freeze_bn))

    def cached_features(self):
        """((train features, labels), (validation features, labels)) of the frozen encoder, extracted once."""
        if self._features is None:
            t0 = time.perf_counter()
            bs, rt = max(32, self.cfg.batch_size), self.runtime
            self._features = (
                cached_features(self.model, self.train_ds, rt, bs),
                cached_features(self.model, self.val_ds, rt, bs),
            )
            self.log(
                "encoder features cached for %d + %d inputs in %.1fs",
                len(self._features[0][0]),
                len(self._features[1][0]),
                time.perf_counter() - t0,
            )
        return self._features

    def validate_head(self, head, vf, vy) -> tuple[np.ndarray, np.ndarray]:
        head.eval()
        with torch.no_grad():
            logits = head(vf).float().cpu().numpy()
        return Logits(vy.cpu().numpy(), logits, study_index(self.val_ds), self.val_ds.aggregation).study_probs()

    def fit_few_shot_head(self, stage: Stage) -> None:
        """The head fitted in closed form on the frozen encoder's features (no augmentation):
        :func:`medtl.train.heads.fit_head`; one "epoch"."""
        t0 = time.perf_counter()
        (xf, yf), (vf, vy) = self.cached_features()
        head = self.model.get_classifier()
        detail = fit_head(stage.name, head, xf, yf, self.num_classes, self.cfg.class_weighting)
        self.epoch += 1
        self.stage_epoch = 1
        self.log("%s head: %s", stage.name, detail)
        self.end_epoch(stage, [], time.perf_counter() - t0, self.validate_head(head, vf, vy))

    def run_head_on_features(self, stage: Stage) -> None:
        """A head-only stage on features extracted once from the (frozen) encoder."""
        (xf, yf), (vf, vy) = self.cached_features()
        head = self.model.get_classifier()
        drop = float(getattr(self.model, "drop_rate", 0.0) or 0.0)
        optimizer = adamw(head.parameters(), self.device, lr=stage.head_lr, weight_decay=self.cfg.weight_decay)
        n, bs = len(xf), self.cfg.batch_size

        def step(idx):
            f, target = self.mixup(xf[idx], self.objective.targets(yf[idx]))
            return self.objective(head(F.dropout(f, drop, training=True)), target)

        def validate():
            return self.validate_head(head, vf, vy)

        self.run_epochs(
            stage,
            optimizer,
            n // bs if n > bs else 1,
            lambda: feature_batches(n, bs, self.rng, xf.device),
            step,
            validate,
            head.train,
        )

    def run_epochs(
        self,
        stage: Stage,
        optimizer,
        steps_per_epoch: int,
        batches: Callable[[], Iterable],
        step: Callable[[Any], torch.Tensor],
        validate: Callable[[], tuple],
        train: Callable,
    ) -> None:
        """The epoch skeleton every stage shares: warm-up + cosine schedule, :func:`train_epoch` over
        ``batches()`` with ``step`` (a batch to its loss), the divergence check, validation, early stopping
        and the best-epoch checkpoint. Encoder stages' throughput is recorded."""
        schedule = self.schedule(optimizer, steps_per_epoch, stage.epochs)
        self.stale, self.optimizer = 0, optimizer
        done = resume_within_stage(self, optimizer, schedule)  # (epochs done already, when resuming within it)
        for k in range(done, stage.epochs):
            self.epoch += 1
            self.stage_epoch = k + 1
            fit_threads(measure=not self.cfg.deterministic)  # other processes may have started or ended
            t0 = time.perf_counter()
            train()
            losses = train_epoch(
                batches(),
                step,
                optimizer,
                schedule,
                self.scaler,
                on_loss=lambda losses: self.check_loss(stage, losses),
                sync_every=loss_sync_steps(self.device),
            )
            seconds = time.perf_counter() - t0
            if not stage.head_only:
                self.encoder_images += len(losses) * self.cfg.batch_size
                self.encoder_seconds += seconds
            if self.end_epoch(stage, losses, seconds, validate()):
                break
            if k + 1 < stage.epochs and self.monitor is not None:  # (a stage's end is saved by run_strategy)
                self.monitor.save(self, (self.stage_index, k + 1), optimizer, schedule)

    def end_epoch(self, stage: Stage, losses, seconds, val: tuple[np.ndarray, np.ndarray]) -> bool:
        """Record the epoch and its validation (labels, probabilities); keep the weights if they are the best
        so far; True: stop the stage."""
        y_val, p_val = val
        if not np.all(np.isfinite(p_val)):
            self.diverged(stage, "non-finite validation outputs")
        val_loss, val_auc = validation_loss(y_val, p_val), compute_auc(y_val, p_val)
        score = val_auc if val_auc is not None else -val_loss
        row = {
            "epoch": self.epoch,
            "stage": stage.name,
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_loss": val_loss,
            "val_auc": val_auc,
            "seconds": round(seconds, 3),
        }
        if self.fixmatch is not None:  # the share of unlabelled answers confident enough to train on
            row["pseudo_confident"] = self.fixmatch.confident_share()
        self.result.history.append(row)
        # a tie in AUC (frequent on small validation sets) goes to the lower loss: the epoch whose probabilities
        # have not collapsed to one side
        improved = score > self.result.best_score + 1e-9 or (
            abs(score - self.result.best_score) <= 1e-9 and val_loss < self.best_val_loss
        )
        if improved:
            self.result.best_score, self.result.best_epoch = score, self.epoch
            self.best_val_loss = val_loss
            self.best_state = copy.deepcopy(plain_state_dict(self.model))
            if self.on_improve is not None and self.rank == 0:
                self.on_improve(self.model, row)
        self.log(
            "epoch %d/%d [%s] train loss %.4f  val loss %.4f  val AUC %s  %.1fs%s%s",
            self.epoch,
            self.total_epochs,
            stage.name,
            row["train_loss"] or float("nan"),
            val_loss,
            f"{val_auc:.3f}" if val_auc is not None else "n/a",
            seconds,
            self.eta(stage),
            "  *" if improved else "",
        )
        if self.monitor is not None and self.rank == 0:
            self.monitor.epoch_end(self, row)
        self.stale = 0 if improved else self.stale + 1
        if self.stale >= self.cfg.patience:
            self.log("stage %s stopped early: no better validation score for %d epochs", stage.name, self.stale)
            return True
        return False

    def epochs_left(self) -> int:
        """Epochs left in the running stage and every later one (early stopping may end a stage sooner)."""
        if not self.stages:
            return 0
        return (
            self.stages[self.stage_index].epochs
            - self.stage_epoch
            + sum(s.epochs for s in self.stages[self.stage_index + 1 :])
        )

    def eta(self, stage: Stage) -> str:
        """``, about N left`` for the whole run: the epochs left in all stages times the running stage's mean epoch
        time so far (it improves as the run goes: a head-only stage's epochs are cheaper than later ones')."""
        times = [row["seconds"] for row in self.result.history if row["stage"] == stage.name]
        left = self.epochs_left()
        if not left or not times:
            return ""
        return f", about {format_seconds(left * float(np.mean(times)))} left"

    def check_loss(self, stage: Stage, losses: list[float]) -> bool:
        """A NaN or infinite step loss stops training (TrainingDivergedError)."""
        if not math.isfinite(losses[-1]):
            self.diverged(stage, f"training loss {losses[-1]} at step {len(losses)}")
        return False

    def diverged(self, stage: Stage, what: str) -> None:
        raise TrainingDivergedError(
            f"training diverged in epoch {self.epoch} ({stage.name} stage): {what}; lower train.lr "
            f"(now {self.cfg.lr:g}), or for a network trained from scratch in small batches use GroupNorm "
            "(e.g. the *_3d_gn encoders)"
        )

    def log(self, *args):
        if self.rank == 0:
            log.info(*args)


def validation_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """The negative log-likelihood of validation labels under the probabilities (multi-label: binary
    cross-entropy per finding)."""
    if labels.ndim == 2:
        return float(
            F.binary_cross_entropy(
                torch.from_numpy(probs).float().clamp(1e-7, 1 - 1e-7), torch.from_numpy(labels).float()
            )
        )
    return float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)), torch.from_numpy(labels).long()))


__all__ = ["Trainer", "FitResult", "validation_loss"]
