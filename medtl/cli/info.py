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
    s.add_argument(
        "--show-paths",
        action="store_true",
        help="show the names of unusable files (a zip member's path may name the patient; by default each is a key)",
    )
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser(
        "encoders",
        help="list the registered encoders, whether their weights are on this machine, and the open names "
        "(timm:NAME, hf-hub:REPO, tv:NAME, xrv:WEIGHTS, open_clip:..., transformers:REPO)",
    )
    s.set_defaults(fn=cmd_encoders)


def cmd_info(args: argparse.Namespace) -> int:
    from medtl.errors import MedtlInputError
    from medtl.io import describe_path_bounded

    usable = 0
    for p in args.paths:  # read in the bounded worker: the files are anyone's
        try:
            report = describe_path_bounded(
                p, series_uid=args.series, modality=args.modality, volume_index=args.volume_index
            )
        except MedtlInputError as e:  # stopped for time or memory, or the reader died
            report = {"path": str(p), "usable": False, "error": f"{type(e).__name__}: {e}"}
        usable += report["usable"]
        print(json.dumps(shown_report(report, args.show_paths), indent=2, default=str))
    return 0 if usable else 1


def shown_report(report: dict, show_paths: bool = False) -> dict:
    """What ``medtl info`` prints of :func:`medtl.io.describe_path`'s report: header fields only where ``medtl
    deid``'s profile keeps them (no SeriesDescription), unusable files' names as keys unless ``show_paths``."""
    from medtl.clinical.deid import profile_keeps
    from medtl.io.series import name_key

    for series in report.get("series", []):
        if not profile_keeps("SeriesDescription"):
            series.pop("description", None)
    image = report.get("image") or {}
    for field in [k for k in image if k[:1].isupper() and not profile_keeps(k)]:
        image.pop(field)
    if not show_paths:
        for entry in report.get("unreadable_files", []):
            entry["file"] = name_key(entry["file"])
    return report


def cmd_encoders(args: argparse.Namespace) -> int:
    from medtl.models import SOURCES, get_encoder_spec, list_encoders
    from medtl.models.hub import library_installed, weights_status

    print(f"{'encoder':18s} {'weights here':13s} description")
    for name in list_encoders():
        spec = get_encoder_spec(name)
        present, where = weights_status(spec)
        state = "yes" if present else "no library" if not library_installed(spec.source) else "no"
        state = "none needed" if spec.source == "monai" else state
        print(f"{name:18s} {state:13s} {spec.description}" + ("" if present else f" [{where}]"))
    print("\nAny other encoder by an open name, SOURCE:REF (weights from the local caches, or --weights-file):")
    for source, what in SOURCES.items():
        print(f"  {source + ':':14s} {what}")
    return 0
