"""Command-line flags made from the configuration's fields.

A flag that sets exactly one field of :class:`medtl.config.ExperimentConfig` is built from that field: its
type from the field's annotation (a fixed set of options, a ``Literal`` of :mod:`medtl.options`, becomes
``choices``), its help from the comment the field carries in ``medtl/config.py``, and its default None: "as
the configuration says" (the ``--config`` file's value, else the field's default). :func:`config_overrides`
turns the flags given back into the overrides of :func:`medtl.config.load_config`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path

from medtl.cli.common import device_name, one_of
from medtl.config import CT_WINDOWS, DataConfig, EncoderConfig, ExplainConfig, TrainConfig

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "encoder": EncoderConfig,
    "train": TrainConfig,
    "explain": ExplainConfig,
}
# fixed sets of options that are not a Literal type: field -> (the options, their name in an error message)
OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {"data.ct_window": ((*CT_WINDOWS, "multi"), "CT window")}
# fields of a fixed form that is not a set of options: field -> (the argparse type that checks it, its metavar)
FORMS: dict[str, tuple[Callable[[str], typing.Any], str]] = {"train.device": (device_name, "{auto,cpu,cuda,cuda:N}")}


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside the field in ``cls``'s source, with its ``#   ...`` continuation
    lines."""
    source = textwrap.dedent(inspect.getsource(cls))
    ends = {
        node.end_lineno: node.target.id
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    comments: dict[str, list[str]] = {}
    field, previous = None, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, text = tok.start[0], tok.string.lstrip("#").strip()
        if row in ends:  # beside a field
            field = ends[row]
            comments[field] = [text]
        elif field and tok.string.startswith("#   ") and row == previous + 1:  # a continuation line
            comments[field].append(text)
        else:
            field = None
        previous = row
    return {name: " ".join(lines) for name, lines in comments.items()}


def _int_or_auto(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _comma_separated(value: str) -> tuple[str, ...]:
    return tuple(value.split(","))


def path_text(value: str) -> str:
    """A path as :mod:`pathlib` writes it (``data/`` -> ``data``): the type of a flag naming a path."""
    return str(Path(value))


def _converter(hint: typing.Any) -> Callable[[str], typing.Any]:
    """The argparse ``type`` of a field annotated ``hint`` (None allowed: None is the flag's default)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if kinds == [int, str]:
        return _int_or_auto  # an integer or "auto" (medtl.config.validate_config)
    if len(kinds) == 1 and kinds[0] in (int, float, str):
        return kinds[0]
    if len(kinds) == 1 and typing.get_args(kinds[0])[:1] == (str,):
        return _comma_separated  # a tuple of strings
    raise TypeError(f"no command-line form for a field of type {hint}")


def field_argument(field: str, converter: Callable[[str], typing.Any] | None = None) -> dict[str, typing.Any]:
    """The ``add_argument`` keywords of a flag setting ``field`` ("section.name"; ``converter``: instead of
    the one its type implies)."""
    section, name = field.split(".")
    cls = SECTIONS[section]
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    comment = field_comments(cls)[name].replace("%", "%%")
    kwargs: dict[str, typing.Any] = {"default": None, "help": f"{comment} [config {field}; default {default!r}]"}
    hint = typing.get_type_hints(cls)[name]
    options, what = OPTIONS.get(field, (None, field))
    if options is None and typing.get_origin(hint) is typing.Literal:
        options = typing.get_args(hint)
    if options:
        kwargs.update(type=one_of(options, what), choices=options)
    elif field in FORMS and converter is None:
        kwargs["type"], kwargs["metavar"] = FORMS[field]
    else:
        kwargs["type"] = converter or _converter(hint)
    return kwargs


def add_config_flags(
    s: argparse.ArgumentParser, flags: dict[str, str], converters: dict[str, Callable[[str], typing.Any]] | None = None
) -> None:
    """Add ``flags`` (flag -> the field it sets, "section.name") to ``s``; ``converters``: field -> a type
    other than the one its annotation implies."""
    for flag, field in flags.items():
        s.add_argument(flag, **field_argument(field, (converters or {}).get(field)))


def config_overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, dict[str, typing.Any]]:
    """The ``load_config`` overrides ({section: {name: value}}) of the ``flags`` given on the command line."""
    overrides: dict[str, dict[str, typing.Any]] = {}
    for flag, field in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            section, name = field.split(".")
            overrides.setdefault(section, {})[name] = value
    return overrides
