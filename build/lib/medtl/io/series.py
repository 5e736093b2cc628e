"""DICOM studies from a folder or a zip: grouped into series, sorted in space, one series chosen.

Instances are grouped by StudyInstanceUID → SeriesInstanceUID (and, inside a series, by
orientation and image size, so a localizer stored with its axial stack is not mixed in), then
sorted along the slice normal computed from ImageOrientationPatient, using
ImagePositionPatient — never by file name or InstanceNumber alone.

Which series is used follows :data:`SERIES_RULES`, in order; ``series_uid`` or ``modality``
override them, and the reason for the choice is reported.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.errors import CorruptImageError, FileMissingError, MedtlInputError, UnsupportedFormatError
from medtl.io.dicom import dataset_to_scan, image_orientation, open_dicom, orientation_letters, sort_along_normal
from medtl.io.scan import Scan

log = logging.getLogger("medtl.io")

SERIES_RULES = (
    "1. the series the user named (series_uid), if given",
    "2. only image series of the requested modality, if given",
    "3. drop localizer/scout and derived projection series (ImageType LOCALIZER, SCOUT, PROJECTION IMAGE)",
    "4. prefer series that form a volume (several slices), then the most slices",
    "5. on a tie, the lowest SeriesNumber",
)
MAX_ZIP_BYTES = 8 << 30  # refuse zips that expand beyond 8 GiB
_EXCLUDED_TYPES = ("LOCALIZER", "SCOUT", "PROJECTION IMAGE")


@dataclass
class Instance:
    """One DICOM file of a study (its header, without pixels)."""

    name: str  # file name inside the folder or zip (no patient data)
    ds: object  # pydicom Dataset; its pixel data is read from the file only when decoded
    data: bytes | None = None  # the file's bytes when it came from a zip
    file: Path | None = None  # the file on disk when it came from a folder


@dataclass
class Series:
    """A set of instances that form one image stack."""

    uid: str  # SeriesInstanceUID (a UID, not a patient identifier)
    number: int  # SeriesNumber (0 when absent)
    modality: str
    description: str  # SeriesDescription
    image_type: str  # ImageType values joined with "\\"
    instances: list[Instance] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return sum(int(i.ds.get("NumberOfFrames", 1) or 1) for i in self.instances)

    def describe(self) -> dict:
        ds = self.instances[0].ds
        return {"series_uid": self.uid, "series_number": self.number, "modality": self.modality,
                "description": self.description, "image_type": self.image_type, "instances": len(self.instances),
                "slices": self.n_slices, "size": [int(ds.get("Rows", 0)), int(ds.get("Columns", 0))]}


@dataclass
class StudyListing:
    """What a folder or zip holds: its series and the files that could not be used."""

    path: Path
    series: list[Series]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)


def _iter_sources(path: Path):
    """Yield (name, bytes-or-path) for every file in a folder (recursive) or a zip."""
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            if p.name.startswith(".") or p.name.upper() == "DICOMDIR":
                continue
            yield str(p.relative_to(path)), p
        return
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if total > MAX_ZIP_BYTES:
                raise CorruptImageError(path, f"zip expands to {total / 2**30:.1f} GiB; refused", "a zip under 8 GiB")
            for m in members:
                name = Path(m.filename).name
                if name.startswith(".") or name.upper() == "DICOMDIR" or m.filename.startswith("__MACOSX"):
                    continue
                yield m.filename, z.read(m)
        return
    raise UnsupportedFormatError(path, "not a folder or a zip of DICOM files")


def list_series(path: str | Path) -> StudyListing:
    """Group every DICOM file of a folder or zip into series (pixel data is read only when a series is decoded)."""
    path = Path(path)
    if not path.exists():
        raise FileMissingError(path, "not found")
    groups: dict[tuple, Series] = {}
    problems = []
    for name, src in _iter_sources(path):
        try:
            ds = open_dicom(src, name, defer_pixels=True)
        except MedtlInputError as e:
            problems.append((name, e.problem))
            continue
        if "SeriesInstanceUID" not in ds:
            problems.append((name, "no SeriesInstanceUID"))
            continue
        rows_cols = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        iop = tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient") or ())
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.SeriesInstanceUID), rows_cols, iop)
        if key not in groups:
            groups[key] = Series(uid=str(ds.SeriesInstanceUID), number=int(ds.get("SeriesNumber", 0) or 0),
                                 modality=str(ds.get("Modality", "")).upper(),
                                 description=str(ds.get("SeriesDescription", "")),
                                 image_type="\\".join(str(v) for v in (ds.get("ImageType") or [])))
        from_zip = isinstance(src, bytes)
        groups[key].instances.append(Instance(name, ds, src if from_zip else None, None if from_zip else src))
    for name, reason in problems:
        log.warning("skipped %s: %s", name, reason)
    series = sorted(groups.values(), key=lambda s: (s.number, s.uid))
    return StudyListing(path=path, series=series, problems=problems)


def choose_series(listing: StudyListing, series_uid: str | None = None,
                  modality: str | None = None) -> tuple[Series, str]:
    """Pick the series to use by :data:`SERIES_RULES`; return it and the reason, in words."""
    candidates = [s for s in listing.series if s.instances[0].ds.get("Rows")]  # image objects only
    if not candidates:
        raise MedtlInputError(listing.path, f"no image series found ({len(listing.problems)} unreadable files)",
                              "a folder or zip holding DICOM images")
    if series_uid:
        match = [s for s in candidates if s.uid == series_uid]
        if not match:
            raise MedtlInputError(listing.path, f"series {series_uid} not found",
                                  "one of " + ", ".join(s.uid for s in candidates))
        return match[0], "chosen by the user (series_uid)"
    reasons = []
    if modality:
        kept = [s for s in candidates if s.modality == modality.upper()]
        if not kept:
            raise MedtlInputError(listing.path, f"no {modality} series",
                                  "one of the modalities " + ", ".join(sorted({s.modality for s in candidates})))
        candidates = kept
        reasons.append(f"modality {modality.upper()}")
    primary = [s for s in candidates if not any(t in s.image_type.upper() for t in _EXCLUDED_TYPES)]
    if primary and len(primary) < len(candidates):
        reasons.append(f"{len(candidates) - len(primary)} localizer/projection series left out")
        candidates = primary
    best = max(candidates, key=lambda s: (s.n_slices > 1, s.n_slices, -s.number))
    reasons.append(f"most slices ({best.n_slices}) of {len(candidates)} candidate series"
                   if len(candidates) > 1 else "the only candidate series")
    return best, "; ".join(reasons)


def read_series(path: str | Path, series_uid: str | None = None, modality: str | None = None) -> Scan:
    """Read the chosen series of a folder or zip as one volume (or one image) in a :class:`Scan`.

    Raises:
        MedtlInputError: nothing usable, inconsistent orientation or size, duplicated
            positions or gaps between slices (geometry is never invented).
    """
    path = Path(path)
    listing = list_series(path)
    series, reason = choose_series(listing, series_uid, modality)
    scan = read_instances(series, path)
    scan.header = {**scan.header, "series": series.describe(), "series_choice": reason,
                   "series_found": len(listing.series), "files_skipped": len(listing.problems)}
    scan.notes.insert(0, f"series {series.number} used: {reason}")
    return scan


def read_instances(series: Series, path: Path) -> Scan:
    """Decode and stack the instances of one series, sorted along the slice normal."""
    scans = [dataset_to_scan(inst.ds, Path(inst.name)) for inst in series.instances]
    if len(scans) == 1:
        scan = scans[0]
        scan.path, scan.source = path, "dicom-series"
        return scan
    if any(s.array.ndim != 2 for s in scans):
        raise CorruptImageError(path, f"series {series.number} holds {len(scans)} instances that are each a volume "
                                "(multi-frame or mosaic: time points or repeats)", "one of its files, read alone")
    iops = [image_orientation(inst.ds) for inst in series.instances]
    positions = [inst.ds.get("ImagePositionPatient") for inst in series.instances]
    if any(i is None for i in iops) or any(p is None or len(p) != 3 for p in positions):
        raise CorruptImageError(path, f"series {series.number}: slices lack ImagePositionPatient/"
                                "ImageOrientationPatient, so their order and spacing are unknown",
                                "a series with patient geometry, or read the files one by one")
    if any(not np.allclose(i, iops[0], atol=1e-3) for i in iops):
        raise CorruptImageError(path, f"series {series.number}: slices have different orientations")
    order, pos, spacing = sort_along_normal([np.array([float(v) for v in p]) for p in positions], iops[0], path,
                                            f"series {series.number}")
    if any(s.array.shape != scans[0].array.shape for s in scans):
        raise CorruptImageError(path, f"series {series.number}: slices of different sizes")
    pix = [s.spacing for s in scans]
    if any(not np.allclose(p, pix[0], rtol=1e-3) for p in pix):
        raise CorruptImageError(path, f"series {series.number}: slices have different pixel spacings")
    array = np.stack([scans[i].array for i in order])
    first = scans[order[0]]
    notes = sorted({n for s in scans for n in s.notes})
    return Scan(array=array, spacing=(spacing, *first.spacing), modality=first.modality, source="dicom-series",
                path=path, units=first.units, header=first.header, window=first.window,
                orientation=orientation_letters(iops[0], volume=True), slice_positions=pos, notes=notes)
