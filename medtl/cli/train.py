"""``medtl sample-data``, ``medtl train`` and ``medtl lr-find``.

The handlers import the training code when they run, not at the top of the module: ``medtl --help`` must not
load torch, MONAI or timm (the command line's one exception to "imports at the top of the module").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medtl.cli.common import OptionError
from medtl.cli.config_flags import add_config_flags, config_overrides, path_text
from medtl.config import ExperimentConfig, load_config

log = logging.getLogger("medtl")

# the flags of `medtl train` and `medtl lr-find` that set one configuration field each: flag -> field
CONFIG_FLAGS = {
    "--data": "data.path",
    "--encoder": "encoder.name",
    "--weights-file": "encoder.weights_file",
    "--strategy": "train.strategy",
    "--unlabelled": "data.unlabelled",
    "--ensemble": "train.ensemble",
    "--label-columns": "data.label_columns",
    "--epochs": "train.epochs",
    "--frozen-epochs": "train.frozen_epochs",
    "--batch-size": "train.batch_size",
    "--input-size": "encoder.input_size",
    "--lr": "train.lr",
    "--seed": "train.seed",
    "--volume-mode": "data.volume_mode",
    "--modality": "data.modality",
    "--ct-window": "data.ct_window",
    "--cache-dir": "data.cache_dir",
    "--device": "train.device",
    "--precision": "train.precision",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample-data", help="write the synthetic labelled CT sample set")
    s.add_argument("out", type=Path)
    s.add_argument("--patients", type=int, default=200, help="patients with 2D DICOM images (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="write over an existing sample set")
    s.set_defaults(fn=cmd_sample_data)

    s = sub.add_parser("train", help="fine-tune an ImageNet encoder on a data set and write a run folder")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="run folder to create")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue RUN, whose training did not finish, from its last epoch with its own configuration "
        "(the same weights as a run never stopped)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing run folder")
    s.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="record the curves in MLflow as well as TensorBoard (train.tracking: both); URI: its tracking "
        "server or store (default: sqlite:///RUN/mlflow.db)",
    )
    add_train_options(s)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("lr-find", help="sweep the head learning rate and suggest one (fastai-style)")
    add_train_options(s)
    s.add_argument("--plot", type=Path, help="write the loss-vs-learning-rate curve to this PNG")
    s.set_defaults(fn=cmd_lr_find)


def add_train_options(s: argparse.ArgumentParser) -> None:
    """The experiment's settings: a ``--config`` file, and flags on top of it (:data:`CONFIG_FLAGS`)."""
    s.add_argument("--config", type=Path, help="experiment YAML (fields of medtl.config.ExperimentConfig)")
    s.add_argument("--manifest", type=path_text, help=argparse.SUPPRESS)  # the name --data had before
    s.add_argument("--no-pretrained", action="store_true", help="random initialisation (from-scratch baseline)")
    add_config_flags(s, CONFIG_FLAGS, converters={"data.path": path_text})


def train_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment of ``--config`` with the flags given on top; an unknown encoder is refused here, before
    any data is read."""
    overrides = config_overrides(args, CONFIG_FLAGS)
    if args.data is None and args.manifest:
        overrides.setdefault("data", {})["path"] = args.manifest
    if args.no_pretrained:
        overrides.setdefault("encoder", {})["pretrained"] = False
    if getattr(args, "mlflow", None) is not None:  # (medtl train only)
        overrides.setdefault("train", {}).update(tracking="both", tracking_uri=args.mlflow or None)
    cfg = load_config(args.config, **overrides)  # a bad key or value fails here, before torch is imported
    from medtl.models import get_encoder_spec

    get_encoder_spec(cfg.encoder.name)  # an unknown encoder too: the registry imports no torch
    return cfg


def cmd_sample_data(args: argparse.Namespace) -> int:
    from medtl.data import create_sample_data

    manifest = create_sample_data(args.out, n_patients=args.patients, seed=args.seed, force=args.force)
    log.info("sample data written: %s", manifest)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return cmd_resume(args)
    cfg = train_config(args)  # checked before the training code (torch) is imported
    from medtl.run import RunDir
    from medtl.train import run_experiment

    return print_result(RunDir(run_experiment(cfg, args.out, force=args.force)))


def cmd_resume(args: argparse.Namespace) -> int:
    """``medtl train --resume RUN``: no other setting may be given (the run keeps its own)."""
    flags = {**{f: getattr(args, f.lstrip("-").replace("-", "_")) for f in CONFIG_FLAGS}, "--mlflow": args.mlflow}
    given = [f for f, value in flags.items() if value is not None]
    given += [
        f for f in ("--config", "--manifest", "--force", "--no-pretrained") if getattr(args, f[2:].replace("-", "_"))
    ]
    if given:
        raise OptionError(f"--resume continues RUN with its own configuration; leave out {', '.join(given)}")
    from medtl.run import RunDir
    from medtl.train import resume_experiment

    return print_result(RunDir(resume_experiment(args.resume)))


def print_result(run) -> int:
    """The run's one-line summary (its test AUC and accuracy)."""
    from medtl.run import RunDir

    metrics = run.read_json(RunDir.METRICS)
    if metrics is None:  # a torchrun worker other than rank 0: it writes nothing
        return 0
    test = metrics["test"]
    auc = "n/a" if test["auc"] is None else f"{test['auc']:.3f}"
    what = "every finding right" if metrics.get("multi_label") else "accuracy"
    print(
        f"{run.path}: test AUC {auc}, {what} {test['accuracy']:.3f} "
        f"({test['n_images']} images, {test['n_patients']} patients)"
    )
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    cfg = train_config(args)  # checked before the training code (torch) is imported
    from medtl.train import find_lr

    found = find_lr(cfg)
    print(
        f"suggested head learning rate: {found.suggestion:.2g} (steepest loss descent over "
        f"{len(found.lrs)} steps from {found.lrs[0]:.1g} to {found.lrs[-1]:.1g})"
    )
    if args.plot:
        found.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0
