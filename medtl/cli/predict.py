"""``medtl predict`` and ``medtl explain``: answer image files with a trained run.

The handlers import the prediction code (torch) when they run, not at the top of the module, so that
``medtl --help`` stays light: the command line's one exception to "imports at the top of the module".
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

from medtl.cli.common import EXIT_CODES, add_choice, add_decision, add_device, each_file, exit_status
from medtl.errors import MedtlError
from medtl.options import BACKENDS, SALIENCY_METHODS

log = logging.getLogger("medtl")


def add_parser(sub) -> None:
    """``predict`` and ``explain`` on ``sub`` (the ``medtl`` parser's sub-commands)."""
    s = sub.add_parser("predict", help="print class probabilities for image files", epilog=EXIT_CODES)
    s.add_argument("run", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument(
        "--recursive",
        action="store_true",
        help="search folders: each folder holding DICOM files is "
        "one input (a study), each NIfTI or picture file another",
    )
    s.add_argument(
        "--csv",
        type=Path,
        help="append one row per input to this CSV instead of printing; inputs "
        "already in it are skipped (an interrupted run resumes)",
    )
    s.add_argument(
        "--show-paths",
        action="store_true",
        help="add each input's path to the CSV (paths may hold patients' names; rows name inputs by a key otherwise)",
    )
    s.add_argument("--batch-size", type=int, default=32, help="model inputs per forward pass, across files")
    add_choice(
        s,
        "--backend",
        BACKENDS,
        "backend",
        default="torch",
        help="torch (default), or for a `medtl export` package its onnx (ONNX Runtime) or torchscript network",
    )
    add_decision(s)
    add_device(s)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("explain", help="write Grad-CAM overlays for image files", epilog=EXIT_CODES)
    s.add_argument("run", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--out", help="output .png (one image) or folder (default: current folder)")
    s.add_argument("--target", help="class to explain (default: the predicted one)")
    add_choice(
        s,
        "--method",
        SALIENCY_METHODS,
        "saliency method",
        help="saliency method (default: the run's, gradcam unless its configuration says otherwise)",
    )
    s.add_argument("--force", action="store_true", help="replace existing overlay files")
    add_decision(s)
    add_device(s)
    s.set_defaults(fn=cmd_explain)


def cmd_predict(args: argparse.Namespace) -> int:
    from medtl.predict.batch import find_inputs, shard_from_environment
    from medtl.predict.predictor import load_run

    rank, world, local_rank = shard_from_environment()
    if world > 1 and not args.csv:
        raise MedtlError("under torchrun, predict writes its rows with --csv (each process takes a shard)")
    device = _shard_device(local_rank) if world > 1 and args.device == "auto" else args.device
    # read in the bounded worker: one hostile file cannot stop the batch
    predictor = load_run(args.run, device=device, bounded=True, backend=args.backend, decision=args.decision)
    with find_inputs(args.images, args.recursive) as inputs:
        if args.csv:
            return _predict_to_csv(args, predictor, inputs, rank, world)
        return _print_predictions(args, predictor, [i.path for i in inputs])


def _shard_device(local_rank: int) -> str:
    """Under torchrun: one GPU per process where there are GPUs."""
    import torch

    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _predict_to_csv(args: argparse.Namespace, predictor, inputs, rank: int, world: int) -> int:
    from medtl.predict.batch import predict_to_csv

    counts = predict_to_csv(predictor, inputs, args.csv, args.batch_size, args.show_paths, rank=rank, world=world)
    where = f" (process {rank + 1} of {world})" if world > 1 else ""
    print(
        f"{args.csv}{where}: {counts['answered']} answered, {counts['refused']} refused, {counts['errors']} "
        f"could not be read, {counts['skipped']} already in the file; {counts['seconds']} s"
    )
    if world > 1:
        _merge_shards(args.csv, rank)
    return exit_status(counts["errors"], counts["refused"])


def _print_predictions(args: argparse.Namespace, predictor, paths: list[Path]) -> int:
    failed = refused = 0
    for _, result in predictor.predict_many(paths, batch_size=args.batch_size):
        if isinstance(result, MedtlError):
            failed += 1
            print(f"error: {result}", file=sys.stderr)
            continue
        print(json.dumps(vars(result)) if args.json else result)
        refused += result.refused is not None
    return exit_status(failed, refused)


def _merge_shards(csv_path: Path, rank: int) -> None:
    """After every process of a torchrun has written its part, the first moves them into ``csv_path``."""
    import torch.distributed as dist

    from medtl.predict.batch import merge_parts

    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))  # shards may end far apart
    try:
        dist.barrier()
        if rank == 0:
            log.info("%s: %d rows from the shards", csv_path, merge_parts(csv_path))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def cmd_explain(args: argparse.Namespace) -> int:
    from medtl.predict.predictor import load_run

    predictor = load_run(args.run, device=args.device, bounded=True, decision=args.decision)
    out = Path(args.out) if args.out else None

    def one(path: Path) -> bool:
        expl = predictor.explain(path, class_name=args.target, method=args.method)
        if expl.prediction.refused:
            print(expl.prediction)
            return True
        target = _overlay_path(out, path, expl.method, single=len(args.images) == 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not args.force:
            raise MedtlError(f"{target} exists; pass --force to replace it")
        expl.save(target)
        print(f"{expl.prediction}\t-> {target}")
        return False

    return each_file(args.images, one)


def _overlay_path(out: Path | None, source: Path, method: str, single: bool) -> Path:
    """``--out`` itself for one image and a .png, else FOLDER/NAME_METHOD.png (the current folder by default)."""
    if out and single and out.suffix == ".png":
        return out
    return (out or Path(".")) / f"{Path(source).name.split('.')[0]}_{method}.png"
