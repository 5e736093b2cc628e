"""The run folder: one owner for every file a run holds, its schema version and checksums.

A run folder is written by ``medtl train`` (:func:`medtl.train.run_experiment`), and read by every other
command. :class:`RunDir` knows each file's name and what writes it; every module reads and writes a
run through it. Each artefact is written once, by one step:

=======================  ==========================================================================
``config.yaml``          the resolved configuration (with ``schema_version``) and what the run resolved
``model.safetensors``    the weights, classes, preprocessing record and the training decision
                         (temperature and operating point chosen on validation data)
``ood.safetensors``      the out-of-distribution detector (:mod:`medtl.predict.ood`)
``bn_source.safetensors`` the BatchNorm layers' input moments on the training images (``medtl adapt``)
``metrics.json``         how training went, validation and test metrics
``history.csv``          one row per epoch
``splits.csv``           each image's split; ``skipped.csv``: rows and files that could not be used
``overlays/``            saliency overlays of test images
``SHA256SUMS``           the sha256 of the weight files, checked when the run is loaded
``evaluation/``          ``medtl evaluate``'s report, model card and its own decision (``decision.json``)
``adaptation.json``      ``medtl adapt``: where an adapted run came from
``export.json``          ``medtl export``: the exported network's record (a package: every file checksummed)
``status.json``          where training stands: running, interrupted, failed or finished, at which epoch
                         (written when the run starts, at every epoch and when it ends)
``checkpoint.pt``        the state to resume training from (:mod:`medtl.train.checkpoint`), replaced
                         atomically every epoch; removed when the run finishes
``train.log``            the lines the terminal showed, timestamped, with debug detail and third-party warnings
``tensorboard/``         TensorBoard event files (``tensorboard --logdir runs``); ``mlflow.db``: MLflow's store
=======================  ==========================================================================

A run whose ``status.json`` does not say ``finished`` is refused by :meth:`RunDir.open` with what happened and
how to resume it (runs written before the status file are read as finished).

Runs of an older schema are read through :data:`MIGRATIONS`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from medtl.config import SCHEMA_VERSION, ExperimentConfig, config_from_dict, read_yaml_mapping, to_plain
from medtl.errors import ConfigError, RunError, RunExistsError
from medtl.models.checkpoint import load_model
from medtl.models.encoders import Preprocessing, file_sha256


def _v1_to_v2(raw: dict) -> dict:
    """Version 1 (no ``schema_version``): runs saved before colour was kept were fed luminance. (In version 1
    ``medtl evaluate`` rewrote ``model.safetensors`` with its own decision; such a run's training decision is
    the evaluation's.)"""
    if isinstance(raw.get("data"), dict) and "color" not in raw["data"]:
        raw["data"]["color"] = "grey"
    return raw


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}  # version -> its config brought to the next


class RunDir:
    """A run folder, and the name of every file in it."""

    path: Path

    CONFIG = "config.yaml"
    MODEL = "model.safetensors"
    OOD = "ood.safetensors"
    BN_SOURCE = "bn_source.safetensors"
    METRICS = "metrics.json"
    HISTORY = "history.csv"
    SPLITS = "splits.csv"
    SKIPPED = "skipped.csv"
    OVERLAYS = "overlays"
    SUMS = "SHA256SUMS"
    EVALUATION = "evaluation"
    DECISION = "decision.json"  # in evaluation/: the decision `medtl evaluate` chose
    EVALUATION_RECORD = "evaluation.json"  # in evaluation/: what `medtl evaluate` measured
    EVALUATION_CARD = "model_card.md"  # in evaluation/: the model card (model_card.json: the same as data)
    EVALUATION_CARD_RECORD = "model_card.json"
    REPORT = "report.html"  # in evaluation/: the self-contained report
    ADAPTATION = "adaptation.json"
    EXPORT = "export.json"
    CARD = "MODEL_CARD.md"  # an export package's model card
    STATUS = "status.json"  # where training stands (running, interrupted, failed, finished)
    CHECKPOINT = "checkpoint.pt"  # the state to resume training from; removed when the run finishes
    TRAIN_LOG = "train.log"
    TENSORBOARD = "tensorboard"
    MLFLOW = "mlflow.db"  # MLflow's local store (train.tracking: mlflow without train.tracking_uri)
    STATES = ("running", "interrupted", "failed", "finished")
    WEIGHT_FILES = (MODEL, OOD, BN_SOURCE)  # checksummed in SHA256SUMS

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    # -- creating and opening ------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, force: bool = False) -> RunDir:
        """A new, empty run folder at ``path``; a folder that holds files is refused unless ``force`` (then
        it is emptied)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not force:
                raise RunExistsError(f"{path} already holds a run; choose another --out or pass --force to replace it")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing, finished run folder (one that holds ``config.yaml`` and its model); a run whose training
        did not finish is refused, saying where it stopped and how to resume it."""
        run = cls(path)
        unfinished = run.unfinished()
        if unfinished:
            raise RunError(unfinished)
        if not (run / cls.CONFIG).is_file():
            raise RunError(f"{run.path}: not a medtl run (no {cls.CONFIG})")
        return run

    @classmethod
    def for_resume(cls, path: str | Path) -> RunDir:
        """A run folder whose training did not finish, to continue (``medtl train --resume``)."""
        run = cls(path)
        status = run.read_status()
        if not (run / cls.CONFIG).is_file() or status is None:
            raise RunError(f"{run.path}: not a medtl run that can be resumed (no {cls.CONFIG} or {cls.STATUS})")
        if status["state"] == "finished":
            raise RunError(f"{run.path}: training finished already; nothing to resume")
        if status["state"] == "running" and _alive(status):
            raise RunError(f"{run.path}: training is still running (process {status.get('pid')})")
        return run

    # -- where training stands -----------------------------------------------------------------------

    def read_status(self) -> dict | None:
        """``status.json``: ``state`` (one of :attr:`STATES`), ``epoch`` and ``epochs`` (done, planned), ``stage``,
        ``pid``, ``host``, ``updated``, ``error`` (failed runs); None for a run written before it existed."""
        path = self / self.STATUS
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise RunError(f"{path}: not a status record (damaged); resume the run or train it again") from None
        if not isinstance(record, dict) or record.get("state") not in self.STATES:
            raise RunError(f"{path}: not a status record (no state among {', '.join(self.STATES)})")
        return record

    def write_status(self, state: str, **fields: Any) -> dict:
        """``status.json`` at ``state`` with ``fields`` (merged into what it held; a field given as None is
        removed), written atomically."""
        record = {**(self.read_status() or {}), **fields, "state": state}
        record = {k: v for k, v in record.items() if v is not None}
        record.update(pid=os.getpid(), host=socket.gethostname(), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        path = self / self.STATUS
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(to_plain(record), indent=2))
        os.replace(tmp, path)
        return record

    def unfinished(self) -> str | None:
        """Why the run cannot be used yet (training running, interrupted or failed; no model), in words with
        what to do; None for a finished run (or one written before ``status.json`` existed)."""
        status, name = self.read_status(), str(self.path)
        if status is None:
            if (self / self.CONFIG).is_file() and not (self / self.MODEL).is_file():
                return f"{name}: training did not finish (no {self.MODEL}); train it again"
            return None
        if status["state"] == "finished":
            return None
        at = _epoch_words(status)
        if status["state"] == "running" and _alive(status):
            return f"{name}: training is still running ({at}); wait for it to finish"
        how = "failed" if status["state"] == "failed" else "interrupted"
        error = f": {status['error']}" if status.get("error") else ""
        return f"{name}: training did not finish ({how} {at}{error}); resume it with medtl train --resume {name}"

    # -- the configuration ---------------------------------------------------------------------------

    def read_raw_config(self) -> dict:
        """``config.yaml`` as written, brought to the current schema (:data:`MIGRATIONS`)."""
        path = self / self.CONFIG
        try:
            raw = read_yaml_mapping(path)
        except ConfigError as e:
            raise RunError(f"{path}: not a run configuration: {e.problem}") from None
        version = raw.get("schema_version", 1)
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise RunError(f"{path}: schema_version {version!r} is not one this medtl reads (1 to {SCHEMA_VERSION})")
        for v in range(version, SCHEMA_VERSION):
            raw = MIGRATIONS[v](raw)
        raw["schema_version"] = SCHEMA_VERSION
        return raw

    def read_config(self) -> tuple[ExperimentConfig, dict]:
        """(the run's configuration, what the run resolved: classes, preprocessing, input record, ...)."""
        raw = self.read_raw_config()
        resolved = raw.pop("resolved", None) or {}
        return config_from_dict(ExperimentConfig, raw, source=self / self.CONFIG), resolved

    def write_config(self, config: dict) -> None:
        """``config.yaml``: a configuration dict (with its ``resolved`` part), stamped with the schema version."""
        config = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in config.items() if k != "schema_version"}}
        (self / self.CONFIG).write_text(yaml.safe_dump(to_plain(config), sort_keys=False))

    # -- records -------------------------------------------------------------------------------------

    def read_json(self, name: str, default: Any = None) -> Any:
        """A JSON file of the run (``default`` when it is absent)."""
        path = self / name
        return json.loads(path.read_text()) if path.is_file() else default

    def write_json(self, name: str, record: Any) -> Path:
        path = self / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_plain(record), indent=2))
        return path

    def write_csv(self, name: str, rows: list[dict], fields: list[str] | None = None) -> Path:
        """A CSV file of ``rows`` (``fields``: its columns; default: every key of any row, in order)."""
        fields = fields or list(dict.fromkeys(k for row in rows for k in row))
        path = self / name
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return path

    @property
    def evaluation(self) -> Path:
        """``evaluation/``: what ``medtl evaluate`` writes."""
        return self / self.EVALUATION

    def read_decision(self) -> dict | None:
        """The decision record ``medtl evaluate`` chose (:meth:`medtl.predict.Decision.to_record`); None where the
        run has not been evaluated. (Training's decision is saved with the weights: read it with the model.)"""
        return self.read_json(f"{self.EVALUATION}/{self.DECISION}")

    def write_decision(self, record: dict) -> Path:
        """``evaluation/decision.json``: the decision ``medtl evaluate`` chose (the weights are not rewritten)."""
        return self.write_json(f"{self.EVALUATION}/{self.DECISION}", record)

    # -- checksums -----------------------------------------------------------------------------------

    def write_checksums(self, names: Iterable[str] | None = None) -> Path:
        """``SHA256SUMS`` (the ``sha256sum`` format) of ``names`` (default: the weight files present)."""
        names = [n for n in (names if names is not None else self.WEIGHT_FILES) if (self / n).is_file()]
        lines = [f"{file_sha256(self / n)}  {n}" for n in sorted(names)]
        path = self / self.SUMS
        path.write_text("\n".join(lines) + "\n")
        return path

    def checksums(self) -> dict[str, str]:
        """File name -> sha256 as ``SHA256SUMS`` lists them (empty when the run has none: runs before 0.2)."""
        path = self / self.SUMS
        if not path.is_file():
            return {}
        listed = {}
        for line in path.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name:
                listed[name] = digest
        return listed

    def verify(self, every_file: bool = False) -> None:
        """Check the files ``SHA256SUMS`` lists against their sha256; RunError naming the first that changed or
        is missing. ``every_file`` (export packages): every file must be listed too."""
        listed = self.checksums()
        present = {p.name for p in self.path.iterdir() if p.is_file() and p.name != self.SUMS}
        names = sorted(present | set(listed)) if every_file else sorted(listed)
        for name in names:
            if name not in listed:
                raise RunError(f"{self.path}: {name} is not listed in {self.SUMS}")
            if name not in present:
                raise RunError(f"{self.path}: {name} is listed in {self.SUMS} but missing")
            if file_sha256(self / name) != listed[name]:
                raise RunError(
                    f"{self.path}: {name} does not match its sha256 in {self.SUMS} (changed after it was written)"
                )


def _epoch_words(status: dict) -> str:
    epoch, epochs = status.get("epoch") or 0, status.get("epochs")
    if not epoch:
        return "before its first epoch ended"
    return f"at epoch {epoch} of {epochs}" if epochs else f"at epoch {epoch}"


def _alive(status: dict) -> bool:
    """Whether the process that wrote a "running" status is still alive (on this machine; another machine's
    is taken as alive: it cannot be checked from here)."""
    pid = status.get("pid")
    if status.get("host") != socket.gethostname():
        return status.get("host") is not None
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # (this process: the run is its own, left running by a previous step of it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_package(folder: str | Path) -> dict:
    """``export.json`` of an export package whose files all match ``SHA256SUMS``; RunError naming the first that
    does not (changed, missing, or not listed)."""
    run = RunDir(folder)
    if not (run / RunDir.SUMS).is_file() or not (run / RunDir.EXPORT).is_file():
        raise RunError(
            f"{run.path}: not a medtl export package (no {RunDir.SUMS} or {RunDir.EXPORT}); "
            "write one with `medtl export RUN --out DIR`"
        )
    run.verify(every_file=True)
    return run.read_json(RunDir.EXPORT)


@dataclass
class SavedRun:
    """A run folder written by :func:`medtl.train.run_experiment`, read back."""

    run_dir: Path
    config: ExperimentConfig  # the run's resolved configuration (config.yaml)
    model: torch.nn.Module  # in eval mode, on the CPU
    encoder: str  # registered encoder name
    class_names: list[str]
    preprocessing: Preprocessing  # how inputs must be prepared for this model
    temperature: float | None = None  # the training decision's calibration (chosen on validation)
    operating_point: dict | None = None  # the training decision's threshold(s) (chosen on validation)
    input_record: dict = field(default_factory=dict)  # modalities and dimensions seen in training
    multi_label: bool = False  # several findings per image, a sigmoid each (class_names: the findings)


def load_saved_run(run_dir: str | Path) -> SavedRun:
    """The configuration and model of a run folder (``config.yaml`` and ``model.safetensors``, checked against
    ``SHA256SUMS`` where the run has one)."""
    run = RunDir.open(run_dir)
    config, resolved = run.read_config()
    run.verify()
    model, meta = load_model(run / RunDir.MODEL)
    return SavedRun(
        run.path,
        config,
        model,
        meta["encoder"],
        meta["class_names"],
        meta["preprocessing"],
        meta["temperature"],
        meta["operating_point"],
        resolved.get("input_record", {}),
        meta["multi_label"],
    )


__all__ = ["RunDir", "SavedRun", "load_saved_run", "verify_package", "MIGRATIONS"]
