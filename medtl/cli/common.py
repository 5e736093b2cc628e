"""What several commands share: exit statuses, the per-file loop, and the options of running a saved run."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from medtl.errors import ConfigError, MedtlError, did_you_mean_device, look_up_option
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


DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"  # what medtl.config.validate_config takes


def add_global_flags(p: argparse.ArgumentParser, default: object = False) -> None:
    """``-v``/``-q``: on the ``medtl`` parser (``default`` False) and on every sub-command's (``default``
    ``argparse.SUPPRESS``: a flag given before the sub-command is not overwritten by the sub-parser's default)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default where it has one worth saying (not None, not False) and the
    help does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text:
            return action.help
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


class CommandParser(argparse.ArgumentParser):
    """The parser of every sub-command (and theirs): the global flags are accepted after the sub-command too,
    and the help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        add_global_flags(self, default=argparse.SUPPRESS)


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


def device_name(value: str) -> str:
    """An argparse ``type``: a device as the configuration takes it (``auto``, ``cpu``, ``cuda``, ``cuda:N``),
    checked before torch is imported; ``gpu``/``gpu:N`` are pointed to ``cuda``/``cuda:N``."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise OptionError(f"unknown device {value!r}{did_you_mean_device(value)} (expected {DEVICE_FORMS})")


def add_device(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--device",
        type=device_name,
        default="auto",
        metavar="{auto,cpu,cuda,cuda:N}",
        help="where the model runs: auto (a GPU where one can be reached), cpu, cuda or cuda:N",
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
