"""``medtl info`` and ``medtl encoders``: what medtl reads from a file, and the encoders it knows.

The handlers import the readers and the model registry when they run, not at the top of the module:
``medtl --help`` loads neither, and ``medtl info`` only the readers (never torch, MONAI or timm).
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    """``info`` and ``encoders`` on ``sub`` (the ``medtl`` parser's sub-commands)."""
    s = sub.add_parser("info", help="show what medtl reads from a file, folder or zip (no patient identifiers)")
    s.add_argument("paths", nargs="+")
    s.add_argument("--series", help="SeriesInstanceUID to use instead of the automatic choice")
    s.add_argument("--modality", help="only consider series of this modality")
    s.add_argument("--volume-index", type=int, help="volume of a 4D NIfTI")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("encoders", help="list the registered encoders")
    s.set_defaults(fn=cmd_encoders)


def cmd_info(args: argparse.Namespace) -> int:
    from medtl.io import describe_path

    usable = 0
    for p in args.paths:
        report = describe_path(p, series_uid=args.series, modality=args.modality, volume_index=args.volume_index)
        usable += report["usable"]
        print(json.dumps(report, indent=2, default=str))
    return 0 if usable else 1


def cmd_encoders(args: argparse.Namespace) -> int:
    from medtl.models import get_encoder_spec, list_encoders

    for name in list_encoders():
        print(f"{name:18s} {get_encoder_spec(name).description}")
    return 0
