"""The ``medtl`` command line: one module per group of commands, each adding its sub-commands
(``add_parser``) and holding their handlers (``cmd_*``).

=================  ===================================================================
``train``          sample-data, train, lr-find
``predict``        predict, explain
``evaluate``       evaluate
``clinical``       deid, dicom-results, pacs query / run / serve
``runs``           adapt, export, serve
``info``           info, encoders
``config_flags``   flags made from the configuration's fields (their type, options, help)
``common``         exit statuses, the per-file loop, options several commands share
=================  ===================================================================

Start-up stays light: building the parser and parsing load no torch, MONAI or timm, so ``medtl --help`` and
``--version`` answer at once and ``medtl info`` loads only the readers. Each handler imports the heavy modules it
needs when it runs: these function-level imports are the command line's deliberate exception to "imports at
the top of the module".
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from medtl.cli import clinical, evaluate, history, info, predict, runs, train
from medtl.cli.common import CommandParser, HelpFormatter, add_global_flags
from medtl.errors import FileMissingError, MedtlError
from medtl.version import __version__

GROUPS = (train, predict, evaluate, clinical, runs, history, info)  # in the order --help lists their commands


def build_parser() -> argparse.ArgumentParser:
    """The ``medtl`` parser: its global options, and each group's sub-commands."""
    p = argparse.ArgumentParser(
        prog="medtl", description="Transfer learning for medical images.", formatter_class=HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"medtl {__version__}")
    add_global_flags(p)
    # every sub-command's parser takes -v/-q too (after the sub-command) and shows its defaults
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def report_errors(fn: Callable[..., int], *args) -> int:
    """``fn(*args)``'s exit code; a medtl error is printed as one line (no traceback) and gives 2."""
    try:
        return fn(*args)
    except MedtlError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, FileMissingError) and "shared" in str(e.path or ""):
            print(
                "  the project's real data sets are in ../shared/data next to a developer's clone (see its "
                "README); a user's clone has none: pass your own manifest, image folder or .npz",
                file=sys.stderr,
            )
        return 2


def run_command(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run its command (usage errors exit through argparse, status 2)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return args.fn(args)


def main(argv: list[str] | None = None) -> int:
    """The ``medtl`` command: its exit status. A value outside a flag's options, like any medtl error, is one
    line on stderr and status 2."""
    return report_errors(run_command, argv)


__all__ = ["build_parser", "main", "report_errors"]
