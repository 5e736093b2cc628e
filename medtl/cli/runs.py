"""``medtl adapt``, ``medtl export`` and ``medtl serve``: a trained run adapted, packaged or served.

The handlers import torch, the export code and the web page when they run, not at the top of the module, so
that ``medtl --help`` stays light: the command line's one exception to "imports at the top of the module".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medtl.cli.common import add_choice, add_decision, add_device, exit_status
from medtl.options import ADAPT_METHODS, EXPORT_FORMATS

AUTH_ENV = "MEDTL_AUTH"  # `serve`: USER:PASS of the page's sign-in (or --auth-file; never on the command line)


def add_parser(sub) -> None:
    """``adapt``, ``export`` and ``serve`` on ``sub`` (the ``medtl`` parser's sub-commands)."""
    s = sub.add_parser("adapt", help="adapt a run to a new site's unlabelled images (AdaBN, TENT): a new run")
    s.add_argument("run", type=Path)
    s.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        help="the new site's image files or folders (searched recursively; no labels needed)",
    )
    s.add_argument("--out", type=Path, required=True, help="the adapted run's folder")
    add_choice(
        s,
        "--method",
        ADAPT_METHODS,
        "adaptation method",
        default="adabn",
        help="adabn (default: BatchNorm statistics matched to the source's), adabn_plain (the target's own "
        "statistics) or tent (entropy minimisation)",
    )
    s.add_argument("--epochs", type=int, default=1, help="tent: passes over the target images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    add_device(s)
    s.set_defaults(fn=cmd_adapt)

    s = sub.add_parser("export", help="write a run as a self-contained ONNX or TorchScript package")
    s.add_argument("run", type=Path)
    s.add_argument("--out", type=Path, required=True, help="the package folder (refused if it holds files)")
    add_choice(
        s,
        "--format",
        EXPORT_FORMATS,
        "export format",
        default="onnx",
        help="onnx (default; written through torch.export) or torchscript (deprecated in torch: only for a network "
        "ONNX cannot hold)",
    )
    s.add_argument("--force", action="store_true", help="replace the package folder's content")
    s.set_defaults(fn=cmd_export)
    add_serve_parser(sub)


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="start the web UI for a run")
    s.add_argument("run", type=Path, help="a run folder, or a folder of runs")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument(
        "--auth-file",
        type=Path,
        help="a file holding USER:PASS required to open the page (or set MEDTL_AUTH=USER:PASS; both stay out of "
        "the process list)",
    )
    s.add_argument("--auth", nargs="?", action=RefuseSecret, help=argparse.SUPPRESS)
    s.add_argument(
        "--retention-minutes",
        type=float,
        default=60.0,
        help="delete an upload this long after it arrived, even if its case is still open (default 60)",
    )
    s.add_argument("--audit-dir", type=Path, help="write audit.log here (default: in each run's folder)")
    s.add_argument(
        "--quality-floor",
        type=float,
        help="no answers from a model whose test AUC's 95%% CI reaches below this (default 0.6; 0 turns it off)",
    )
    add_device(s)
    add_decision(s)
    s.set_defaults(fn=cmd_serve)


def cmd_adapt(args: argparse.Namespace) -> int:
    from medtl.adapt.site import adapt_run
    from medtl.predict.batch import find_inputs
    from medtl.run import RunDir

    with find_inputs(args.data, recursive=True, group_studies=False) as inputs:  # every image file
        record = adapt_run(
            args.run,
            [i.path for i in inputs],
            args.out,
            args.method,
            force=args.force,
            device=args.device,
            epochs=args.epochs,
            seed=args.seed,
        )
    for error in record["errors"]:
        print(f"error: {error}", file=sys.stderr)
    print(
        f"{args.out}: {record['method']} on {record['target_images']} target images "
        f"({record['skipped_files']} skipped); provenance in {RunDir(args.out) / RunDir.ADAPTATION}"
    )
    return exit_status(len(record["errors"]), 0)


def cmd_export(args: argparse.Namespace) -> int:
    from medtl.extras import require

    if args.format == "onnx":  # a core install is told which extra to add, before torch is imported
        require("export", "onnx", "medtl export --format onnx")
    from medtl.export import export_run
    from medtl.run import RunDir, verify_package

    out = export_run(args.run, args.out, args.format, force=args.force)
    record = verify_package(out)
    print(
        f"{out}: {record['format']} ({record['file']}, by {record['exporter']}), probabilities within "
        f"{record['parity_max_probability_difference']:.1e} of PyTorch; files listed in {RunDir(out) / RunDir.SUMS}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    auth = serve_auth(args)  # checked before the web page's libraries are imported
    from medtl.extras import require

    require("ui", "gradio", "medtl serve")  # a core install is told which extra to add, before any work
    from medtl.eval.quality import FLOOR_ENV
    from medtl_ui.app import launch

    if args.quality_floor is not None:  # (read by the page for each model: medtl.eval.quality.quality_floor)
        os.environ[FLOOR_ENV] = str(args.quality_floor)
    launch(
        args.run,
        host=args.host,
        port=args.port,
        auth=auth,
        device=args.device,
        decision=args.decision,
        retention_s=args.retention_minutes * 60,
        audit_dir=args.audit_dir,
    )
    return 0


class RefuseSecret(argparse.Action):
    """A flag that would put a secret on the command line (where every user sees it in the process list): a
    usage error (exit 2) saying where the secret goes instead, without echoing it."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string} would show the password in the process list: put USER:PASS in a file given by "
            f"--auth-file, or in the environment variable {AUTH_ENV}"
        )


def serve_auth(args: argparse.Namespace) -> str | None:
    """USER:PASS for ``serve``, from ``--auth-file``, else ``$MEDTL_AUTH``, else None (no sign-in); refused
    unless both parts are there (the password is never echoed)."""
    from medtl.errors import ConfigError

    if args.auth_file is not None:
        try:
            auth, source = args.auth_file.read_text(encoding="utf-8").strip(), args.auth_file
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                args.auth_file, f"cannot be read ({type(e).__name__})", "a text file: USER:PASS"
            ) from None
    elif os.environ.get(AUTH_ENV):
        auth, source = os.environ[AUTH_ENV].strip(), None
    else:
        return None
    user, sep, password = auth.partition(":")
    if not (sep and user and password):
        where = "" if source is not None else f"${AUTH_ENV} "
        raise ConfigError(source, f"{where}does not hold USER:PASS (a user, a colon, a password)")
    return auth
