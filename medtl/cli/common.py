"""What several commands share: exit statuses, the per-file loop, and the options of running a saved run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from medtl.errors import ConfigError, MedtlError, look_up_option
from medtl.options import DECISION_SOURCES

EXIT_FAILED, EXIT_REFUSED = 1, 3  # a file could not be read; the model refused a file (unlike its training images)
EXIT_CODES = (
    "exit status: 0 every file answered; 1 a file could not be read (reported, the others done); "
    "2 a usage or run error; 3 the model refused a file unlike its training images (reason printed)"
)
DECISION_HELP = (
    "which decision the run answers by: the one chosen on validation data when it was trained "
    "(default), or the one `medtl evaluate` chose"
)


class OptionError(MedtlError):
    """A command-line value outside its fixed set of options. Not a ``ValueError``, so argparse lets it through
    to :func:`medtl.cli.report_errors`: one line in the library's words (the options, the nearest), exit 2."""


def one_of(options: Iterable[str], what: str) -> Callable[[str], str]:
    """An argparse ``type`` that accepts one of ``options`` (given as ``choices`` too, for the help) and refuses
    anything else as :func:`medtl.errors.look_up_option` does (``what`` names the setting in the message)."""
    options = tuple(options)

    def check(value: str) -> str:
        try:
            return look_up_option(value, options, what)
        except ConfigError as e:
            raise OptionError(str(e)) from None

    return check


def add_choice(s: argparse.ArgumentParser, flag: str, options: Iterable[str], what: str, **kwargs) -> None:
    """``flag`` taking one of ``options`` (``what``: its name in the error message)."""
    options = tuple(options)
    s.add_argument(flag, type=one_of(options, what), choices=options, **kwargs)


def add_device(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--device", default="auto", help="auto (a GPU where one can be reached; default), cpu, cuda or cuda:N"
    )


def add_decision(s: argparse.ArgumentParser) -> None:
    """``--decision``: the commands that answer with a run (:func:`medtl.predict.predictor.load_run`)."""
    add_choice(s, "--decision", DECISION_SOURCES, "decision", default="training", help=DECISION_HELP)


def each_file(paths: Iterable[str | Path], fn: Callable[[str | Path], bool]) -> int:
    """Run ``fn`` on every file; report a bad one and go on. Exit status 1 if any file failed, else 3
    if the model refused any (``fn`` returns True for a refusal), else 0."""
    failed = refused = 0
    for path in paths:
        try:
            refused += bool(fn(path))
        except MedtlError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return exit_status(failed, refused)


def exit_status(failed: int, refused: int) -> int:
    return EXIT_FAILED if failed else EXIT_REFUSED if refused else 0
