"""Manifests: CSV files listing ``image``, ``label`` and ``patient_id`` (optional ``modality``, ``study_id``, ``site``)."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from medtl.errors import ManifestError

log = logging.getLogger("medtl.data")

REQUIRED_COLUMNS = ("image", "label", "patient_id")


@dataclass
class Problem:
    """A row or file that was skipped, and why (never holds patient identifiers)."""

    where: str  # "manifest.csv row 7" or an image path
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Manifest:
    """A labelled data set: its usable records, class names, skipped rows and any fixed split.

    Built from a manifest CSV (:func:`read_manifest`), an image folder or a MedMNIST ``.npz``
    (see :func:`medtl.data.read_dataset`).
    """

    path: Path
    records: list[dict]  # {"image": absolute path or array, "label": class index, "patient_id": str, ...}
    class_names: list[str]  # label value of each class index
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, list[int]] | None = None  # fixed train/val/test record indices (MedMNIST), else None
    kind: str = "manifest"  # "manifest", "folder" or "medmnist"

    def label_counts(self, indices=None) -> dict[str, int]:
        counts = {name: 0 for name in self.class_names}
        for i in (range(len(self.records)) if indices is None else indices):
            counts[self.class_names[self.records[i]["label"]]] += 1
        return counts

    def __repr__(self) -> str:
        patients = len({r["patient_id"] for r in self.records})
        split = f", fixed split {{{', '.join(f'{k}: {len(v)}' for k, v in self.splits.items())}}}" \
            if self.splits else ""
        return (f"Manifest({self.path.name} [{self.kind}]: {len(self.records)} images, {patients} patients, "
                f"labels {self.label_counts()}, {len(self.problems)} skipped{split})")


def _class_order(values: list[str]) -> list[str]:
    unique = sorted(set(values))
    try:
        return [str(v) for v in sorted(unique, key=float)]
    except ValueError:
        return unique


def index_labels(records: list[dict], problems: list[Problem]) -> list[str]:
    """Replace each record's ``label_value`` by a class index; log the skipped rows; return the class names."""
    class_names = _class_order([r["label_value"] for r in records])
    index = {name: i for i, name in enumerate(class_names)}
    for r in records:
        r["label"] = index[r.pop("label_value")]
    for p in problems:
        log.warning("skipped %s", p)
    return class_names


def read_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read a manifest CSV. Image paths are relative to the manifest's folder unless absolute.

    Rows with an empty field or a missing image are reported (logged and kept in
    ``Manifest.problems``) and skipped; the rest is used.

    Raises:
        ManifestError: the file is missing, not a CSV with the required columns, or has no usable row.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found", "a CSV with columns " + ", ".join(REQUIRED_COLUMNS))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(path, f"not a readable CSV ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}",
                            "a header with " + ", ".join(REQUIRED_COLUMNS))
    root = path.parent
    records, problems = [], []
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        where = f"{path.name} row {i}"
        empty = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if empty:
            problems.append(Problem(where, f"empty {', '.join(empty)}"))
            continue
        image = Path(row["image"])
        image = image if image.is_absolute() else root / image
        if check_files and not image.is_file():
            problems.append(Problem(where, f"image {row['image']} not found"))
            continue
        rec = {"image": str(image), "label_value": row["label"], "patient_id": row["patient_id"]}
        for extra in ("modality", "study_id", "site"):
            if row.get(extra):
                rec[extra] = row[extra]
        records.append(rec)
    if not records:
        raise ManifestError(path, f"no usable rows ({len(problems)} skipped)")
    return Manifest(path=path, records=records, class_names=index_labels(records, problems), problems=problems)
