"""Manifests: CSV files listing ``image``, ``label`` and ``patient_id`` (optional ``modality``, ``study_id``,
``site``, and ``label_name``: the class's name in words where ``label`` is an index, e.g. ``1,lesion``).

Multi-label manifests (several findings per image, the chest X-ray setting) give the findings instead of
``label``: a ``findings`` column of names separated by ``|`` (``effusion|nodule``; ``No Finding`` for none,
as in ChestX-ray14), or one 0/1 column per finding named by ``data.label_columns`` (CheXpert's layout)."""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.errors import ConfigError, ManifestError

log = logging.getLogger("medtl.data")

REQUIRED_COLUMNS = ("image", "label", "patient_id")
FINDINGS_COLUMN = "findings"  # a multi-label manifest's column: finding names separated by FINDINGS_SEPARATOR
FINDINGS_SEPARATOR = "|"
NO_FINDING = ("no finding", "no findings")  # a ``findings`` value for an image with none of them


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
    records: list[dict]  # {"image": absolute path or array, "label": class index, "patient_id": str, ...};
    #   multi-label: "label" is a tuple of 0/1, one per finding
    class_names: list[str]  # label value of each class index (multi-label: the findings' names)
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, list[int]] | None = None  # fixed train/val/test record indices (MedMNIST), else None
    kind: str = "manifest"  # "manifest", "folder" or "medmnist"
    multi_label: bool = False  # several findings per image (sigmoid outputs) rather than one class
    positive: str | None = None  # two classes: the finding (the clinically positive class) where the source
    #   names one (MedMNIST's tables: BreastMNIST's is "malignant", its first class); None: the second class

    def label_counts(self, indices=None) -> dict[str, int]:
        """Images per class (multi-label: images with each finding)."""
        return label_counts(
            [self.records[i]["label"] for i in (range(len(self.records)) if indices is None else indices)],
            self.class_names,
        )

    def __repr__(self) -> str:
        patients = len({r["patient_id"] for r in self.records})
        split = (
            f", fixed split {{{', '.join(f'{k}: {len(v)}' for k, v in self.splits.items())}}}" if self.splits else ""
        )
        return (
            f"Manifest({self.path.name} [{self.kind}]: {len(self.records)} images, {patients} patients, "
            f"labels {self.label_counts()}, {len(self.problems)} skipped{split})"
        )


def positive_class(data, manifest: Manifest) -> str | None:
    """The finding of a two-class data set (the class a positive answer means): ``data.positive_class`` where
    set (a class name, or its index), else the source's own (:attr:`Manifest.positive`), else None (the second
    class). A ``positive_class`` that names no class, or is given for more classes, is a :class:`ConfigError`."""
    wanted = getattr(data, "positive_class", None)
    if wanted is None:
        return manifest.positive
    names = list(manifest.class_names)
    if manifest.multi_label or len(names) != 2:
        raise ConfigError(
            None,
            f"data.positive_class {wanted!r} is set, but the data has {len(names)} "
            f"{'findings' if manifest.multi_label else 'classes'}",
            "it only for two-class data (each finding of multi-label data is its own positive)",
        )
    if str(wanted) in names:
        return str(wanted)
    if str(wanted) in ("0", "1"):
        return names[int(wanted)]
    raise ConfigError(None, f"data.positive_class {wanted!r} is not one of the classes", " or ".join(map(repr, names)))


def is_multi_label(label) -> bool:
    """Whether a record's label is a multi-label one (a 0/1 per finding) rather than a class index."""
    return isinstance(label, (tuple, list, np.ndarray))


def label_counts(labels, class_names: list[str]) -> dict[str, int]:
    """Examples per class of ``labels`` (class indices), or positives per finding (multi-label 0/1 rows)."""
    if len(labels) and is_multi_label(labels[0]):
        totals = np.asarray(labels, dtype=np.int64).sum(axis=0)
        return {name: int(totals[i]) for i, name in enumerate(class_names)}
    counts = dict.fromkeys(class_names, 0)
    for y in labels:
        counts[class_names[int(y)]] += 1
    return counts


def label_text(label, names: list[str]) -> str:
    """A record's label in words: its class name, or its findings joined by "|" ("No Finding" for none)."""
    if is_multi_label(label):
        return FINDINGS_SEPARATOR.join(n for n, v in zip(names, label) if v) or NO_FINDING[0].title()
    return names[int(label)]


MISSING_LABELS = ("", "nan", "none", "null", "na", "n/a", "?", "-", "missing")
_INDEX = re.compile(r"^\d+(\.0+)?$")  # a class index: 0, 1, 2 (or 1.0)
_NAME = re.compile(r"^[^\W\d_][\w .+/()-]*$")  # a class name: starts with a letter


def _label_form(value: str) -> str:
    return "index" if _INDEX.match(value) else "name" if _NAME.match(value) else "other"


def _class_order(values: list[str]) -> list[str]:
    unique = sorted(set(values))
    try:
        return [str(v) for v in sorted(unique, key=float)]
    except ValueError:
        return unique


def index_labels(
    records: list[dict],
    problems: list[Problem],
    classes: tuple[str, ...] | list[str] | dict[str, str] | None = None,
    where=lambda r: str(r.get("image", "")),
) -> tuple[list[dict], list[str]]:
    """Check every record's ``label_value`` and replace it by a class index; return (kept records, class names).

    With ``classes`` (``data.classes``), only those labels are accepted, in that order; a mapping
    ``{label: name}`` also gives the classes their names. Without
    them, the labels must share one form: all class indices (``0``, ``1``, ...) or all names
    starting with a letter. Missing labels (empty, ``nan``, ``none``, ...) and labels of
    another form than the majority's (``-1``, ``2.5``, ``yes`` among indices) are reported in
    ``problems`` with their row, and skipped. Skipped rows are logged.
    """
    kept = _present_labels(records, problems, where)
    classes, names = _classes_and_names(classes)
    if classes is not None:
        good, class_names = _listed_labels(kept, classes, problems, where)
    else:
        good, class_names = _majority_form_labels(kept, problems, where)
    index = {name: i for i, name in enumerate(class_names)}
    for r in good:
        r["label"] = index[r.pop("label_value")]
    for p in problems:
        log.warning("skipped %s", p)
    if names is None:
        names = _named(good, class_names)
    return good, names


def _present_labels(records: list[dict], problems: list[Problem], where) -> list[dict]:
    """The records with a ``label_value`` (a class index written as a whole number); the rest to ``problems``."""
    kept = []
    for r in records:
        value = str(r["label_value"]).strip()
        if value.lower() in MISSING_LABELS:
            problems.append(Problem(where(r), f"label missing ({value!r})"))
            continue
        r["label_value"] = str(int(float(value))) if _INDEX.match(value) else value
        kept.append(r)
    return kept


def _classes_and_names(classes) -> tuple[list[str] | tuple[str, ...] | None, list[str] | None]:
    """(the labels of ``data.classes``, their names or None): a mapping {label: name} gives both."""
    if not isinstance(classes, dict):
        return classes, None
    labels, names = [_label_key(k) for k in classes], [str(v) for v in classes.values()]
    if len(set(names)) != len(names):
        raise ManifestError(
            None, f"data.classes gives two labels one name ({', '.join(names)})", "a different name for each label"
        )
    return labels, names


def _listed_labels(kept: list[dict], classes, problems: list[Problem], where) -> tuple[list[dict], list[str]]:
    """(the records labelled with one of ``classes``, the class names in that order); the rest to ``problems``."""
    class_names = [_label_key(c) for c in classes]
    allowed = set(class_names)
    good = [r for r in kept if r["label_value"] in allowed]
    for r in kept:
        if r["label_value"] not in allowed:
            problems.append(
                Problem(
                    where(r), f"label {r['label_value'][:24]!r} is not one of data.classes ({', '.join(class_names)})"
                )
            )
    return good, class_names


def _majority_form_labels(kept: list[dict], problems: list[Problem], where) -> tuple[list[dict], list[str]]:
    """(the records whose label has the majority's form, index or name; their classes); the rest to ``problems``."""
    forms = [_label_form(r["label_value"]) for r in kept]
    n_index, n_name = forms.count("index"), forms.count("name")
    form = "index" if n_index >= n_name else "name"
    good = [r for r, f in zip(kept, forms) if f == form]
    expected = (
        "a class index (0, 1, 2, ...) like the other rows"
        if form == "index"
        else "a class name starting with a letter, like the other rows"
    )
    for r, f in zip(kept, forms):
        if f != form:
            problems.append(
                Problem(
                    where(r), f"label {r['label_value'][:24]!r} is not {expected} (or list the labels in data.classes)"
                )
            )
    return good, _class_order([r["label_value"] for r in good])


def _label_key(value) -> str:
    value = str(value).strip()
    return str(int(float(value))) if _INDEX.match(value) else value


def _named(records: list[dict], class_names: list[str]) -> list[str]:
    """The classes' names from the records' ``label_name`` (a manifest's optional column), where every
    class has exactly one; otherwise the labels themselves."""
    given: dict[int, set[str]] = {}
    for r in records:
        if r.get("label_name"):
            given.setdefault(r["label"], set()).add(r.pop("label_name"))
        r.pop("label_name", None)
    if not given:
        return class_names
    named = [next(iter(given[i])) if len(given.get(i, ())) == 1 else None for i in range(len(class_names))]
    if None in named or len(set(named)) != len(named):
        log.warning("label_name column ignored: each label needs exactly one name, and names must differ")
        return class_names
    return named


def inside(root: Path, image: str) -> Path | None:
    """``image`` resolved against ``root``, or None when it is absolute or leads out of ``root``.

    The check is on the path as written (``..`` components), so a dataset folder reached through a
    symbolic link still works.
    """
    p = Path(image)
    if p.is_absolute() or p.drive:
        return None
    joined = Path(os.path.normpath(root / p))
    return joined if joined == root or root in joined.parents else None


def read_manifest(
    path: str | Path,
    check_files: bool = True,
    classes: tuple[str, ...] | None = None,
    allow_outside_paths: bool = False,
    label_columns: tuple[str, ...] | None = None,
) -> Manifest:
    """Read a manifest CSV. Image paths are relative to the manifest's folder.

    A path that is absolute or leads out of that folder (``../``) is refused unless
    ``allow_outside_paths`` (``data.allow_outside_paths``). Rows with an empty field, a missing
    image, a path outside the folder or a bad label (see :func:`index_labels`) are reported
    (logged and kept in ``Manifest.problems``, by row number and file) and skipped; the rest is used.

    A manifest without ``label`` but with a ``findings`` column, or read with ``label_columns``
    (``data.label_columns``: one 0/1 column per finding), is multi-label (see :func:`index_findings`).

    Raises:
        ManifestError: the file is missing, not a CSV with the required columns, or has no usable row.
    """
    path = Path(path)
    rows, columns = _read_rows(path)
    multi = (
        "columns"
        if label_columns
        else FINDINGS_COLUMN
        if "label" not in columns and FINDINGS_COLUMN in columns
        else None
    )
    required = [c for c in REQUIRED_COLUMNS if c != "label" or not multi] + list(label_columns or ())
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(
            path,
            f"missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}",
            "a header with " + ", ".join(REQUIRED_COLUMNS) + f" (multi-label: {FINDINGS_COLUMN} in "
            "place of label, or the 0/1 columns named by data.label_columns)",
        )
    root = Path(os.path.normpath(path.parent.absolute()))
    records, problems = [], []
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        row = {(k or "").strip(): (v if isinstance(v, str) else "").strip() for k, v in row.items()}
        rec = _record(row, f"{path.name} row {i}", root, problems, check_files, allow_outside_paths)
        if rec is not None:
            if multi == "columns":
                rec["label_value"] = {c: row.get(c, "") for c in label_columns}
            else:
                rec["label_value"] = row.get(FINDINGS_COLUMN if multi else "label", "")
            records.append(rec)
    if multi:
        records, class_names = index_findings(records, problems, classes, lambda r: r["row"], label_columns)
    else:
        records, class_names = index_labels(records, problems, classes, where=lambda r: r["row"])
    for r in records:
        r.pop("row")
    if not records:
        raise ManifestError(path, f"no usable rows ({len(problems)} skipped)")
    return Manifest(path=path, records=records, class_names=class_names, problems=problems, multi_label=bool(multi))


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(the rows, the column names) of a manifest CSV; ManifestError when it is missing or not a readable CSV."""
    if not path.is_file():
        raise ManifestError(path, "manifest not found", "a CSV with columns " + ", ".join(REQUIRED_COLUMNS))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = [c.strip() for c in (rows[0].keys() if rows else []) if c is not None]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(path, f"not a readable CSV ({e})") from None
    return rows, columns


def _record(
    row: dict, where: str, root: Path, problems: list[Problem], check_files: bool, allow_outside_paths: bool
) -> dict | None:
    """The record of one manifest row (image, patient, optional columns; its label is added by the caller), or
    None with the reason appended to ``problems``: an empty field, a path outside the folder, a missing image."""
    empty = [c for c in REQUIRED_COLUMNS if c != "label" and not row.get(c)]
    if empty:
        problems.append(Problem(where, f"empty {', '.join(empty)}"))
        return None
    image = inside(root, row["image"])
    if image is None:
        if not allow_outside_paths:
            problems.append(
                Problem(
                    where,
                    f"image path {row['image']} is absolute or leads out of the manifest's "
                    "folder (set data.allow_outside_paths to allow it)",
                )
            )
            return None
        image = Path(row["image"]) if Path(row["image"]).is_absolute() else root / row["image"]
    if check_files and not image.is_file():
        problems.append(Problem(where, f"image {row['image']} not found"))
        return None
    rec = {"image": str(image), "patient_id": row["patient_id"], "row": where}
    for extra in ("modality", "study_id", "site", "label_name"):
        if row.get(extra):
            rec[extra] = row[extra]
    return rec


_ZERO_ONE = {"0": 0, "0.0": 0, "false": 0, "1": 1, "1.0": 1, "true": 1}


def index_findings(
    records: list[dict],
    problems: list[Problem],
    classes: tuple[str, ...] | list[str] | dict[str, str] | None = None,
    where=lambda r: str(r.get("image", "")),
    columns: tuple[str, ...] | None = None,
) -> tuple[list[dict], list[str]]:
    """Multi-label records: replace each record's ``label_value`` by a tuple of 0/1, one per finding;
    return (kept records, finding names).

    ``label_value`` is either a ``findings`` cell (names separated by ``|``; ``No Finding`` for none) or a
    mapping {column: value} of 0/1 columns (``1``, ``0``, ``true``, ``false``). With ``classes``
    (``data.classes``), a ``findings`` cell may only name those, in that order (a mapping {finding: name}
    also renames them); without, the findings are those named anywhere, sorted. A missing cell, a value
    that is not 0 or 1 (CheXpert's -1 "uncertain" is one: decide it before training) and a finding
    outside ``data.classes`` are reported in ``problems`` with their row, and skipped.
    """
    kept = _read_findings(records, problems, where)
    rename = None
    if kept and "label" in kept[0]:  # 0/1 columns: the findings are the columns, named by data.classes' mapping
        names = list(columns or ())
        if isinstance(classes, dict):
            names = [str(classes.get(c, c)) for c in names]
        for p in problems:
            log.warning("skipped %s", p)
        return kept, names
    if isinstance(classes, dict):
        classes, rename = list(classes), [str(v) for v in classes.values()]
    names = (
        [str(c).strip() for c in classes] if classes is not None else sorted({f for r in kept for f in r["findings"]})
    )
    good = _allowed_findings(kept, names, problems, where)
    for p in problems:
        log.warning("skipped %s", p)
    return good, rename or names


def _read_findings(records: list[dict], problems: list[Problem], where) -> list[dict]:
    """The records whose ``label_value`` reads as findings (a 0/1 ``label`` or ``findings``); the rest to problems."""
    kept = []
    for r in records:
        value = r.pop("label_value")
        if isinstance(value, dict):
            bad = {c: v for c, v in value.items() if v.strip().lower() not in _ZERO_ONE}
            if bad:
                c, v = next(iter(bad.items()))
                problems.append(
                    Problem(
                        where(r),
                        f"column {c!r}: {v[:24]!r} is not 0 or 1"
                        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                    )
                )
                continue
            r["label"] = tuple(_ZERO_ONE[v.strip().lower()] for v in value.values())
            kept.append(r)
            continue
        value = str(value).strip()
        if value.lower() in MISSING_LABELS:
            problems.append(Problem(where(r), f"findings missing ({value!r}; write {NO_FINDING[0]!r} for none)"))
            continue
        r["findings"] = (
            []
            if value.lower() in NO_FINDING
            else sorted({f.strip() for f in value.split(FINDINGS_SEPARATOR) if f.strip()})
        )
        kept.append(r)
    return kept


def _allowed_findings(kept: list[dict], names: list[str], problems: list[Problem], where) -> list[dict]:
    """The records whose findings are all among ``names``, each with its 0/1 ``label``; the rest to ``problems``."""
    allowed, good = set(names), []
    for r in kept:
        outside = [f for f in r["findings"] if f not in allowed]
        if outside:
            problems.append(
                Problem(where(r), f"finding {outside[0][:24]!r} is not one of data.classes ({', '.join(names)})")
            )
            continue
        present = set(r.pop("findings"))
        r["label"] = tuple(int(n in present) for n in names)
        good.append(r)
    return good
