"""Following a training run while it runs, and after: ``RUN/status.json``, ``RUN/train.log``, the curves
(TensorBoard event files in ``RUN/tensorboard``, MLflow on request) and the checkpoint each epoch.

:func:`follow_run` wraps a run of :func:`medtl.train.run_experiment`: it opens the log file, marks the run
``running`` and, when the block ends, ``finished`` (the checkpoint is then removed: the run's model holds what
is kept), ``interrupted`` (Ctrl-C, SIGTERM) or ``failed`` (the error's type). It yields a :class:`RunMonitor`,
which :func:`medtl.train.fit` tells of every epoch: the status and the curves are updated and the checkpoint
is replaced (:mod:`medtl.train.checkpoint`). Under ``torchrun`` only rank 0 writes.

``train.tracking``: ``tensorboard`` (default), ``mlflow``, ``both`` or ``off``. MLflow's store is
``train.tracking_uri`` or, by default, a local database in the run (``sqlite:///RUN/mlflow.db``: MLflow 3
refuses new plain-file stores); its run id is kept in ``status.json`` so that a resumed run goes on logging
into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from medtl.config import ExperimentConfig, to_dict
from medtl.errors import ConfigError
from medtl.progress import log_to_file
from medtl.run import RunDir
from medtl.runtime import distributed
from medtl.train.checkpoint import checkpoint_state, load_checkpoint, save_atomic

log = logging.getLogger("medtl.train")


class Curves:
    """Where the per-epoch scalars go: a TensorBoard ``SummaryWriter`` and/or an MLflow run (either may be off)."""

    def __init__(self, run: RunDir, cfg: ExperimentConfig, first_step: int = 0):
        self.tensorboard = None
        self.mlflow = None  # (client, run id)
        if cfg.train.tracking in ("tensorboard", "both"):
            self.tensorboard = _summary_writer(run / RunDir.TENSORBOARD, first_step)
        if cfg.train.tracking in ("mlflow", "both"):
            self.mlflow = _mlflow_run(run, cfg)

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        """``values`` (name -> number; None is left out) at ``step``, written out at once."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric  # (optional dependency: loaded only with tracking: mlflow)

            client, run_id = self.mlflow
            now = _milliseconds()
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, state: str) -> None:
        """Close the writers; the MLflow run ends as ``state`` says (finished, interrupted: killed, failed)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(state, "KILLED"))


def _milliseconds() -> int:
    return int(time.time() * 1000)


def _summary_writer(folder: Path, first_step: int):
    """A TensorBoard writer into ``folder``; a resumed run's writer purges the steps from ``first_step`` on (an
    epoch logged after the last checkpoint, before the run stopped, is logged again). None, with a warning, where
    the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # (needs the tensorboard package; loads it)
    except ImportError:
        log.warning("no TensorBoard curves: the tensorboard package is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder), purge_step=first_step or None)


def _mlflow_run(run: RunDir, cfg: ExperimentConfig) -> tuple:
    """(client, run id) of the run's MLflow run: the one ``status.json`` names (a resumed run), or a new one in the
    experiment named after the run's parent folder, with the configuration as its parameters."""
    try:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            None, "train.tracking 'mlflow' needs the mlflow package, which is not installed", "pip install mlflow"
        ) from None
    uri = cfg.train.tracking_uri or f"sqlite:///{(run / RunDir.MLFLOW).resolve()}"
    quiet = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [q.level for q in quiet]
    for q in quiet:  # (MLflow logs its database set-up at INFO level)
        q.setLevel(logging.WARNING)
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = (run.read_status() or {}).get("mlflow_run_id")
        if run_id is None:
            name = run.path.resolve().parent.name or "medtl"
            found = client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else client.create_experiment(name)
            run_id = client.create_run(experiment, run_name=run.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in _flat(to_dict(cfg)).items()]
            client.log_batch(run_id, params=params)
            run.write_status("running", mlflow_run_id=run_id, mlflow_uri=uri)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    log.info("MLflow run %s in %s", run_id, uri)
    return client, run_id


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunMonitor:
    """What :func:`medtl.train.fit` tells of each epoch: ``status.json``, the curves, the checkpoint. ``resume``:
    the checkpoint to continue from (None: a new run). :meth:`part` follows one training of several (``auto``'s
    candidates, an ensemble's members): its curves under its own name, no checkpoints."""

    def __init__(self, run: RunDir, curves: Curves | None, resume: dict | None = None, part: str = ""):
        self.run, self.curves, self.resume, self.name = run, curves, resume, part
        self.checkpoint_path = run / RunDir.CHECKPOINT
        self.writes = distributed()[0] == 0
        self.t0 = time.perf_counter()
        self.before = float(resume.get("seconds", 0.0)) if resume else 0.0  # seconds of the sessions before

    def seconds(self) -> float:
        """The run's seconds so far: this session's and those of the sessions it resumed."""
        return self.before + time.perf_counter() - self.t0

    def summary(self, metrics: dict) -> None:
        """The run's test metrics into the curves (once, at the end)."""
        if self.curves is not None and self.writes:
            test = metrics.get("test", {})
            values = {"test/auc": test.get("auc"), "test/accuracy": test.get("accuracy"), "seconds": metrics["seconds"]}
            self.curves.scalars(values, 0)

    def part(self, name: str) -> RunMonitor:
        return RunMonitor(self.run, self.curves, None, f"{self.name}{name}/")

    def epoch_end(self, trainer, row: dict) -> None:
        """After an epoch (rank 0): the status and the curves (losses, validation AUC, each group's rate)."""
        if not self.writes:
            return
        stage = f"{self.name}{row['stage']}"
        self.run.write_status("running", epoch=trainer.epoch, epochs=trainer.total_epochs, stage=stage)
        if self.curves is None:
            return
        values = {
            f"{self.name}loss/train": row["train_loss"],
            f"{self.name}loss/val": row["val_loss"],
            f"{self.name}auc/val": row["val_auc"],
            f"{self.name}seconds/epoch": row["seconds"],
        }
        if trainer.optimizer is not None:
            for k, group in enumerate(trainer.optimizer.param_groups):
                values[f"{self.name}lr/group{k}"] = group["lr"]
        self.curves.scalars(values, trainer.epoch)

    def save(self, trainer, position: tuple[int, int], optimizer=None, schedule=None) -> None:
        """The checkpoint of where training stands (rank 0; not for a part of several trainings)."""
        if self.writes and not self.name:
            state = checkpoint_state(trainer, position, optimizer, schedule)
            state["seconds"] = self.seconds()
            save_atomic(state, self.checkpoint_path)


@contextlib.contextmanager
def follow_run(run: RunDir, cfg: ExperimentConfig, resume: bool = False) -> Iterator[RunMonitor]:
    """While the block trains ``run`` (rank 0): ``train.log``, ``status.json`` (running, then finished, interrupted
    or failed), the curves and the checkpoints. ``resume``: continue from ``checkpoint.pt`` where there is one (a
    run stopped before its first epoch ended has none: it starts again)."""
    path = run / RunDir.CHECKPOINT
    state = load_checkpoint(path) if resume and path.is_file() else None
    if distributed()[0] != 0:
        yield RunMonitor(run, None, state)
        return
    with log_to_file(run / RunDir.TRAIN_LOG), _sigterm_interrupts():
        if resume:
            log.info("resuming %s from %s", run.path, f"epoch {state['epoch']}" if state else "the start")
        run.write_status("running", epoch=state["epoch"] if state else 0, error=None)
        curves, outcome = None, "failed"
        try:
            curves = Curves(run, cfg, state["epoch"] + 1 if state else 0) if cfg.train.tracking != "off" else None
            yield RunMonitor(run, curves, state)
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "interrupted"
            run.write_status(outcome)
            log.warning("%s: interrupted; resume it with medtl train --resume %s", run.path, run.path)
            raise
        except BaseException as e:
            run.write_status(outcome, error=type(e).__name__)  # (its type only: a message may name a patient's file)
            raise
        finally:
            if curves is not None:
                curves.close(outcome)
        run.write_status("finished")
        path.unlink(missing_ok=True)  # (the model and the history hold what a finished run keeps)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) raises KeyboardInterrupt while the block runs, so the run is
    marked interrupted; the previous handler is put back after. (Only in the main thread, where signals land.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["follow_run", "RunMonitor", "Curves"]
