"""``describe_path``: what medtl reads from a file, folder or zip — the data behind ``medtl info``."""

from __future__ import annotations

import zipfile
from pathlib import Path

from medtl.errors import MedtlInputError
from medtl.io.reader import read_image
from medtl.io.series import SERIES_RULES, choose_series, list_series, read_instances


def describe_path(
    path: str | Path,
    series_uid: str | None = None,
    modality: str | None = None,
    volume_index: int | None = None,
    decode: bool = True,
) -> dict:
    """A de-identified report of ``path``: for a file its geometry and values, or the error; for a
    folder or zip every series found, which one would be used and why, and the unreadable files.

    ``report["usable"]`` is True when an image could be read. ``decode=False`` lists a folder's or
    zip's series from their headers only, without decoding the chosen one (for a caller that reads
    it next anyway).
    """
    path = Path(path)
    is_study = path.is_dir() or (path.is_file() and zipfile.is_zipfile(path) and path.suffix.lower() == ".zip")
    if not is_study:
        try:
            return {"path": str(path), "usable": True, **read_image(path, volume_index=volume_index).summary()}
        except MedtlInputError as e:
            return {"path": str(path), "usable": False, "error": f"{type(e).__name__}: {e}"}
    report: dict = {"path": str(path), "usable": False, "series_rules": list(SERIES_RULES)}
    try:
        listing = list_series(path)
    except MedtlInputError as e:
        return {**report, "error": f"{type(e).__name__}: {e}"}
    report["series"] = [s.describe() for s in listing.series]
    report["unreadable_files"] = [{"file": name, "reason": reason} for name, reason in listing.problems]
    try:
        chosen, reason = choose_series(listing, series_uid, modality)
    except MedtlInputError as e:
        return {**report, "error": f"{type(e).__name__}: {e}"}
    report["chosen"] = {"series_uid": chosen.uid, "series_number": chosen.number, "reason": reason}
    if not decode:
        return report
    try:
        scan = read_instances(chosen, path)
        report["image"] = scan.summary()
        report["usable"] = True
    except MedtlInputError as e:
        report["error"] = f"{type(e).__name__}: {e}"
    return report
