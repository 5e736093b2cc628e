"""Prediction over many files and folders: one CSV row per input, resumable, with progress.

``predict_to_csv(predictor, inputs, "out.csv")`` puts every input through
:meth:`medtl.predict.Predictor.predict_many` (the inputs of several files go through the model
together) and appends one row per input as soon as it is answered. Run again on the same inputs,
it skips those already in the file: an interrupted run resumes where it stopped, and no input gets
two rows. Rows name inputs by a key (a hash of the path), not by the path, which may hold a
patient's name; ``show_paths`` adds the path.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medtl.errors import MedtlError
from medtl.io.dicom import open_dicom
from medtl.io.reader import sniff_format
from medtl.io.walk import walk_files
from medtl.predict.predictor import Prediction, Predictor

log = logging.getLogger("medtl.predict.batch")


def input_key(path: Path) -> str:
    """A key naming an input without its path: the first 12 hex digits of the sha256 of the resolved path."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def study_input_key(study_uid: str) -> str:
    """A key naming a DICOM study without its UID (which can be traced to the patient): ``study-`` and
    the first 12 hex digits of the UID's sha256."""
    return "study-" + hashlib.sha256(str(study_uid).encode()).hexdigest()[:12]


@dataclass
class BatchInput:
    """One input of a batch: a file, a folder, or a DICOM study gathered from wherever its files lie."""

    key: str  # what its CSV row is named by (no path, no patient data)
    path: Path  # what the predictor reads (a study's files are linked into one private folder)
    source: Path  # where it came from: the file or folder given, or the folder of the study's first file


class Inputs(list):
    """:func:`find_inputs`' list of :class:`BatchInput`; closing it removes the private study folders."""

    def __init__(self, items=(), folder: tempfile.TemporaryDirectory | None = None):
        super().__init__(items)
        self._folder = folder

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _looks_dicom(path: Path) -> bool:
    """A DICOM preamble, or a DICOM file name (.dcm, .dicom, .ima, or none at all, as PACS exports name them)."""
    if path.suffix.lower() in ("", ".dcm", ".dicom", ".ima") or path.name.replace(".", "").isdigit():
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _study_uid(path: Path) -> str:
    """A DICOM file's StudyInstanceUID from its header ("" when it has none or cannot be read: the file
    is then an input of its own, and its reading error is reported with it)."""
    try:  # a deflated file's header is inflated alone, within a few MiB (pydicom would inflate it all)
        return str(open_dicom(path, path, header_only=True).get("StudyInstanceUID", "") or "")
    except Exception:  # any damage: reported when the file is read for real, in the bounded reader
        return ""


def find_inputs(paths: Iterable[str | Path], recursive: bool = False, group_studies: bool = True) -> Inputs:
    """The inputs under ``paths``: files as given, folders as one series each. With ``recursive`` a folder
    is searched instead: every NIfTI or picture file is an input, and DICOM files are grouped into studies
    by their StudyInstanceUID, wherever they lie under the folder (a study's series are often in folders
    of their own). A study is read as one input, its series chosen by medtl's rules; a DICOM file that
    names no study is an input of its own. Close the result (or use it in ``with``) to remove the private
    folders that hold links to each study's files. ``group_studies=False``: every image file is an input."""
    out: list[BatchInput] = []
    studies: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        if not recursive or not path.is_dir():
            out.append(BatchInput(input_key(path), path, path))
            continue
        for f in walk_files(path, lambda name: not name.startswith(".") and name.upper() != "DICOMDIR"):
            try:
                kind = sniff_format(f)
            except (MedtlError, OSError):
                continue  # not an image file (a text note, a CSV): not an input
            if kind == "dicom" and not _looks_dicom(f):
                continue  # an unknown extension without DICOM's preamble (README.md, a CSV): not an input
            uid = _study_uid(f) if kind == "dicom" and group_studies else ""
            if uid:
                studies.setdefault(uid, []).append(f)
            else:
                out.append(BatchInput(input_key(f), f, f))
    holder = tempfile.TemporaryDirectory(prefix="medtl-studies-") if any(len(v) > 1 for v in studies.values()) else None
    for k, (uid, members) in enumerate(studies.items()):
        key = study_input_key(uid)
        if len(members) == 1:
            out.append(BatchInput(key, members[0], members[0]))
            continue
        assert holder is not None  # made above, since this study has several files
        study_folder = Path(holder.name) / f"{k:06d}"
        study_folder.mkdir(mode=0o700)
        for i, f in enumerate(members):
            (study_folder / f"{i:06d}.dcm").symlink_to(f.resolve())
        out.append(BatchInput(key, study_folder, members[0].parent))
    unique = list({i.key: i for i in out}.values())
    return Inputs(unique, holder)


def done_keys(csv_path: Path, column: str = "input") -> set[str]:
    """The input keys already in ``csv_path``; a last line cut off by an interruption is removed."""
    if not csv_path.is_file():
        return set()
    data = csv_path.read_bytes()
    if data and not data.endswith(b"\n"):  # killed while writing a row: drop the partial row
        data = data[: data.rfind(b"\n") + 1]
        csv_path.write_bytes(data)
    with open(csv_path, newline="") as f:
        return {row[column] for row in csv.DictReader(f) if row.get(column)}


def predict_to_csv(
    predictor: Predictor,
    inputs: list[BatchInput],
    csv_path: str | Path,
    batch_size: int = 32,
    show_paths: bool = False,
    check: bool = True,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Append a row per input of ``inputs`` not yet in ``csv_path``; return the counts (``done``,
    ``skipped`` as already there, ``answered``, ``refused``, ``errors``) and the ``seconds`` taken.
    A file that cannot be read gets a row with its error, a refused one its reason, and the rest go on.

    With ``world`` > 1 (processes started by ``torchrun``), process ``rank`` takes every ``world``-th
    input not yet done and appends its rows to ``csv_path.part<rank>``; :func:`merge_parts` then moves
    them into ``csv_path``. Inputs in any part file count as done, so a killed sharded run resumes too."""
    todo, csv_path = _todo(inputs, Path(csv_path), rank, world)
    fields = _columns(predictor.class_names, show_paths)
    counts: dict[str, int | float] = {
        "inputs": len(inputs),
        "skipped": len(inputs) - len(todo),
        "answered": 0,
        "refused": 0,
        "errors": 0,
    }
    new = not csv_path.is_file() or csv_path.stat().st_size == 0
    if new:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        elif _header(csv_path) != fields:
            raise MedtlError(f"{csv_path} was written for other classes or columns; choose another --csv")
        _write_rows(predictor, todo, (f, writer), counts, t0, check, batch_size)
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts


def _todo(inputs: list[BatchInput], final: Path, rank: int, world: int) -> tuple[list[BatchInput], Path]:
    """The inputs of ``inputs`` this process answers (those in no row of ``final`` or its parts yet; with
    ``world`` > 1 its shard of them) and the file its rows go to."""
    done = done_keys(final) | {k for part in part_files(final) for k in done_keys(part)}
    if world > 1:  # this process's shard of *all* the inputs (by key: the same in every process, whatever the
        # others have written already; sharding what is left would shift as a faster process writes its part,
        # and leave inputs to no one), less what is done; its rows go to its own part
        shard = sorted(inputs, key=lambda i: i.key)[rank::world]
        return [i for i in shard if i.key not in done], final.with_name(f"{final.name}.part{rank}")
    return [i for i in inputs if i.key not in done], final


def _columns(classes: list[str], show_paths: bool) -> list[str]:
    """The CSV's columns for a model of ``classes`` (``path`` with ``show_paths``)."""
    return [
        "input",
        *(["path"] if show_paths else []),
        "study_key",
        "status",
        "label",
        *[f"p_{c}" for c in classes],
        "ood_score",
        "decision",
        "reason",
    ]


def _write_rows(
    predictor: Predictor,
    todo: list[BatchInput],
    out: tuple[IO[str], csv.DictWriter],
    counts: dict[str, int | float],
    t0: float,
    check: bool,
    batch_size: int,
) -> None:
    """Write and flush a row per input of ``todo`` as it is answered, logging progress every 5 seconds and at
    the end (``t0``: when the run started). ``out``: the open CSV file and its writer."""
    f, writer = out
    by_path = {str(i.path): i for i in todo}
    paths = [i.path for i in todo]
    last = 0.0
    for k, (path, result) in enumerate(predictor.predict_many(paths, check=check, batch_size=batch_size), 1):
        writer.writerow(_row(by_path[str(path)], result, counts))
        f.flush()
        now = time.perf_counter() - t0
        if now - last >= 5 or k == len(todo):
            last = now
            _log_progress(k, len(todo), int(counts["skipped"]), now)


def _row(item: BatchInput, result: Prediction | MedtlError, counts: dict[str, int | float]) -> dict[str, object]:
    """The CSV row of ``item``'s answer, refusal or error, counted in ``counts``."""
    row: dict[str, object] = {"input": item.key, "path": str(item.source)}
    if isinstance(result, MedtlError):
        counts["errors"] += 1
        row.update(status="error", reason=_without_path(str(result), item))
        return row
    row.update(study_key=result.study_key, ood_score=result.ood_score)
    if result.refused:
        counts["refused"] += 1
        row.update(status="refused", reason=result.refused)
    else:
        counts["answered"] += 1
        row.update(
            status="answered",
            label=result.label,
            decision=result.decision,
            **{f"p_{c}": round(v, 6) for c, v in result.probabilities.items()},
        )
    return row


def _log_progress(k: int, n: int, skipped: int, seconds: float) -> None:
    """Log ``k`` of ``n`` inputs answered after ``seconds``, the rate and the time left."""
    rate = k / seconds if seconds > 0 else 0.0
    eta = (n - k) / rate if rate else 0.0
    log.info("%d/%d inputs (%d already done), %.1f inputs/s, ETA %d:%02d", k, n, skipped, rate, eta // 60, eta % 60)


def part_files(csv_path: str | Path) -> list[Path]:
    """The part files of a sharded run writing ``csv_path`` (see :func:`predict_to_csv`)."""
    csv_path = Path(csv_path)
    return sorted(
        p for p in csv_path.parent.glob(csv_path.name + ".part*") if p.name[len(csv_path.name) + 5 :].isdigit()
    )


def merge_parts(csv_path: str | Path) -> int:
    """Append the rows of ``csv_path``'s part files that it does not hold yet, then remove the parts; the
    number of rows moved. Run by one process after all the shards have ended."""
    csv_path = Path(csv_path)
    done, moved = done_keys(csv_path), 0
    for part in part_files(csv_path):
        done_keys(part)  # drops a row cut off by a kill
        with open(part, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r.get("input") and r["input"] not in done]
            fields = reader.fieldnames or []
        new = not csv_path.is_file() or csv_path.stat().st_size == 0
        if not new and _header(csv_path) != fields:
            raise MedtlError(f"{part} was written for other classes or columns than {csv_path}")
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        done |= {r["input"] for r in rows}
        moved += len(rows)
        part.unlink()
    return moved


def shard_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) set by ``torchrun``; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def _header(csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as f:
        return next(csv.reader(f), [])


def _without_path(message: str, item: BatchInput) -> str:
    """An error message with the input's paths (which may hold a patient's name) replaced by its key."""
    for p in (item.path, item.source):
        for form in (str(p), str(Path(p).resolve()), Path(p).name):
            if form:
                message = message.replace(form, f"input {item.key}")
    return message


__all__ = [
    "find_inputs",
    "predict_to_csv",
    "input_key",
    "study_input_key",
    "done_keys",
    "merge_parts",
    "part_files",
    "shard_from_environment",
    "BatchInput",
    "Inputs",
]
