"""One case on the page: what the page keeps about it (:class:`Case`), and its upload stored under random names
with a key that tells cases apart without naming the patient."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.clinical.deid import profile_keeps
from medtl.io import Scan
from medtl.models.encoders import file_sha256
from medtl.predict.predictor import Predictor
from medtl_ui.safety import looks_identifying, store_upload

MAX_MAPS = 64  # saliency maps kept per case (slices × methods × findings); the oldest go first


@dataclass
class Case:
    """Everything the page keeps about the current case (in the user's session only)."""

    path: Path  # the stored upload (random name) or the private folder of its files
    scan: Scan
    key: str = ""  # case identifier: a hash of the uploaded bytes (not a patient identifier)
    files: list[str] = field(default_factory=list)  # names the page may show (identifying ones replaced)
    series: list[dict] = field(default_factory=list)  # the series of a multi-file upload (for the picker)
    series_uid: str | None = None  # the series shown, where there was a choice
    series_note: str = ""  # which series was used and why, in words
    prediction: dict = field(default_factory=dict)  # vars(Prediction)
    refused: str | None = None
    image: np.ndarray | None = None  # the model's view of the explained slice, [0, 1]
    saliency: np.ndarray | None = None
    method: str = "gradcam"
    slice_index: int = 0  # the slice the model judged (or scored highest); the middle one where it judged none
    judged_slice: bool = True  # False where the model judged no single slice (a projection, a 3D volume)
    series_chosen: bool = False  # the user picked the series (not the automatic rules)
    inputs: tuple | None = None  # the model's inputs and their parts, kept to draw more maps
    judged: str = ""  # what of the scan the model judged, in words
    message: str = ""
    maps: dict = field(default_factory=dict)  # (method, finding, slice) -> saliency map, computed on demand
    target: str | None = None  # the class (multi-label: the finding) the map explains; None: the model's default

    @property
    def n_slices(self) -> int:
        return int(self.scan.array.shape[0]) if self.scan.is_volume else 1

    def keep_map(self, key: tuple, saliency: np.ndarray) -> None:
        """Keep a saliency map under ``(method, finding, slice)``; past :data:`MAX_MAPS`, the oldest goes."""
        self.maps[key] = saliency
        while len(self.maps) > MAX_MAPS:
            self.maps.pop(next(iter(self.maps)))


def case_key(paths: list[Path]) -> str:
    """A key that tells cases apart in reports without naming the patient: a hash of the files' bytes."""
    digests = sorted(file_sha256(Path(p)) for p in paths)  # the files in any order
    return "case-" + hashlib.sha256("".join(digests).encode()).hexdigest()[:12]


def store_case_files(files, workdir: Path) -> tuple[Path | None, list[str], str]:
    """(path to read, names the page may show, case key) for an upload: the files moved to random names in
    a private folder (one file: that file; several: their folder)."""
    Path(workdir).mkdir(mode=0o700, parents=True, exist_ok=True)
    stored = store_upload(files, workdir)
    if not stored:
        return None, [], ""
    path = stored[0].path if len(stored) == 1 else stored[0].path.parent
    return path, [s.display for s in stored], case_key([s.path for s in stored])


def shown_description(text) -> bool:
    """Whether a SeriesDescription may be shown: only where ``medtl deid``'s profile keeps it (PS3.15's Basic
    Profile removes it: free text that may name the patient), and never text that looks identifying."""
    return profile_keeps("SeriesDescription") and bool(text) and not looks_identifying(str(text))


def series_options(series: list[dict]) -> list[tuple[str, str]]:
    """(label, series UID) for the series picker: one entry per series UID; entries that would read alike (same
    number, modality, slices and size) are told apart by their place in the upload."""
    seen, options = set(), []
    for s in series:
        if s["series_uid"] in seen:
            continue
        seen.add(s["series_uid"])
        desc = f" · {s['description']}" if shown_description(s.get("description")) else ""
        options.append(
            (
                f"series {s['series_number']} · {s['modality']}{desc} · {s['slices']} slice(s) · "
                f"{s['size'][0]}×{s['size'][1]}",
                s["series_uid"],
            )
        )
    labels = [label for label, _ in options]
    return [
        (
            f"{label} · {labels[: i + 1].count(label)} of {labels.count(label)} alike"
            if labels.count(label) > 1
            else label,
            uid,
        )
        for i, (label, uid) in enumerate(options)
    ]


def read_as(predictor: Predictor, scan: Scan) -> str:
    """The modality the model reads ``scan`` as: its own, or (a NIfTI or a picture that names none) the one
    modality the model was trained on (as :class:`~medtl.predict.predictor.Predictor` does)."""
    if scan.modality:
        return scan.modality.upper()
    seen = [m for m in (predictor.input_record or {}).get("modalities", []) if m not in ("UNKNOWN", "")]
    return seen[0] if len(seen) == 1 else ""
