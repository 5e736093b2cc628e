"""DICOM studies from a folder or a zip: grouped into series, sorted in space, one series chosen.

Instances are grouped by StudyInstanceUID → SeriesInstanceUID (and, inside a series, by
orientation and image size, so a localizer stored with its axial stack is not mixed in), then
sorted along the slice normal computed from ImageOrientationPatient, using
ImagePositionPatient — never by file name or InstanceNumber alone.

Which series is used follows :data:`SERIES_RULES`, in order; ``series_uid`` or ``modality``
override them, and the reason for the choice is reported.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medtl.errors import (
    CorruptImageError,
    FileMissingError,
    InputTooLargeError,
    MedtlInputError,
    UnsupportedFormatError,
)
from medtl.io.dicom import dataset_to_scan, declared_bytes, open_dicom, patient_key, study_key
from medtl.io.dicom_geometry import image_orientation, orientation_letters, sort_along_normal
from medtl.io.guard import reading
from medtl.io.limits import ReadLimits, read_limits
from medtl.io.scan import Scan
from medtl.io.walk import walk_files

log = logging.getLogger("medtl.io")

SERIES_RULES = (
    "1. the series the user named (series_uid), if given",
    "2. only image series of the requested modality, if given",
    "3. drop localizer/scout and derived projection series (ImageType LOCALIZER, SCOUT, PROJECTION IMAGE)",
    "4. prefer series that form a volume (several slices), then the most slices",
    "5. on a tie, the lowest SeriesNumber",
)
_EXCLUDED_TYPES = ("LOCALIZER", "SCOUT", "PROJECTION IMAGE")


@dataclass
class Instance:
    """One DICOM file of a study (its header, without pixels)."""

    name: str  # file name inside the folder or zip (no patient data)
    ds: pydicom.Dataset  # its pixel data is read from the file only when decoded
    file: Path | None = None  # the file on disk (for a zip: its member, unpacked into a private folder)
    keep: object = None  # what keeps that private folder alive (a TemporaryDirectory), or None


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
        return {
            "series_uid": self.uid,
            "series_number": self.number,
            "modality": self.modality,
            "study_key": study_key(ds),
            "patient_key": patient_key(ds),
            "description": self.description,
            "image_type": self.image_type,
            "instances": len(self.instances),
            "slices": self.n_slices,
            "size": [int(ds.get("Rows", 0)), int(ds.get("Columns", 0))],
        }


def name_key(name: str) -> str:
    """A key for a file or zip member name in logs and reports (``DOE_JOHN_19700101/IM0001`` may name the
    patient): ``file-`` and 10 hex of its sha256, the same for the same name."""
    return "file-" + hashlib.sha256(str(name).encode("utf-8", "replace")).hexdigest()[:10]


@dataclass
class StudyListing:
    """What a folder or zip holds: its series and the files that could not be used."""

    path: Path
    series: list[Series]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)


def _iter_sources(path: Path):
    """Yield (name, path, keep) for every file in a folder (recursive) or a zip; ``keep`` is the
    private folder a zip member was unpacked into. A member that cannot be unpacked comes as
    (name, None, problem). The members, together, never pass the memory budget.
    """
    limits = read_limits()
    if path.is_dir():
        for p in _folder_files(path, limits):
            yield str(p.relative_to(path)), p, None
        return
    with reading(path, "zip file"):
        z = zipfile.ZipFile(path)
    with z:
        members = _zip_members(z, path, limits)
        # members are unpacked one at a time into a private folder (mode 0700, removed with the
        # listing): memory stays flat, and the pixels are read from disk only when decoded
        folder = tempfile.TemporaryDirectory(prefix="medtl-zip-")
        written = 0
        for i, m in enumerate(members):
            target = Path(folder.name) / f"{i:06d}.dcm"  # never the member's own name (no ../ tricks)
            try:
                # (messages do not name the member: its path may hold a patient's name; the listing keys it)
                with reading(path, "a zip member"), z.open(m) as f, open(target, "wb") as out:
                    first = True
                    while piece := f.read(1 << 20):
                        if first and not _dicom_head(piece):  # not inflated further: a bomb of zeros stops here
                            raise MedtlInputError(path, "not a DICOM file (no DICM preamble or valid dataset)")
                        first = False
                        written += len(piece)
                        if written > limits.max_bytes:
                            raise InputTooLargeError(
                                path,
                                f"zip member {i + 1} inflates past the memory "
                                f"budget ({limits.max_bytes} bytes for the whole study); refused",
                            )
                        out.write(piece)
            except InputTooLargeError:
                folder.cleanup()
                raise
            except MedtlInputError as e:
                target.unlink(missing_ok=True)
                yield m.filename, None, e.problem
                continue
            yield m.filename, target, folder


def _dicom_head(head: bytes) -> bool:
    """Whether a file's first bytes can begin DICOM: the DICM preamble, or (without one) an element of group
    0000, 0002 or 0008, where a dataset written without its preamble starts."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x00\x00", b"\x02\x00", b"\x08\x00")


def _folder_files(path: Path, limits: ReadLimits) -> list[Path]:
    """The files of a folder (recursive, sorted), without hidden files and DICOMDIR, up to ``limits.max_files``."""
    keep = lambda name: not name.startswith(".") and name.upper() != "DICOMDIR"  # noqa: E731
    return sorted(walk_files(path, keep, max_files=limits.max_files))


def _zip_members(z: zipfile.ZipFile, path: Path, limits: ReadLimits) -> list[zipfile.ZipInfo]:
    """A zip's file members, without hidden files, DICOMDIR and __MACOSX, once their number and size fit ``limits``."""
    members = [
        m
        for m in z.infolist()
        if not m.is_dir()
        and not Path(m.filename).name.startswith(".")
        and Path(m.filename).name.upper() != "DICOMDIR"
        and not m.filename.startswith("__MACOSX")
    ]
    if len(members) > limits.max_files:
        raise InputTooLargeError(
            path,
            f"zip holds {len(members)} files, more than the limit of {limits.max_files}",
            "a zip of one study, or raise MEDTL_MAX_INPUT_FILES",
        )
    total = sum(m.file_size for m in members)
    limits.check(path, total, f"unpacking {len(members)} zip members")
    return members


def list_series(path: str | Path) -> StudyListing:
    """Group every DICOM file of a folder or zip into series (pixel data is read only when a series is decoded)."""
    path = Path(path)
    if not path.exists():
        raise FileMissingError(path, "not found")
    if not path.is_dir() and not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(path, "not a folder or a zip of DICOM files")
    groups: dict[tuple, Series] = {}
    problems = []
    for name, src, extra in _iter_sources(path):
        if src is None:
            problems.append((name, extra))
            continue
        try:
            ds = open_dicom(src, name, defer_pixels=True)
            with reading(name, "DICOM header"):
                if "SeriesInstanceUID" not in ds:
                    problems.append((name, "no SeriesInstanceUID"))
                    continue
                rows_cols = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
                iop = tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient") or ())
                key = (str(ds.get("StudyInstanceUID", "")), str(ds.SeriesInstanceUID), rows_cols, iop)
                if key not in groups:
                    groups[key] = Series(
                        uid=str(ds.SeriesInstanceUID),
                        number=int(ds.get("SeriesNumber", 0) or 0),
                        modality=str(ds.get("Modality", "")).upper(),
                        description=str(ds.get("SeriesDescription", "")),
                        image_type="\\".join(str(v) for v in (ds.get("ImageType") or [])),
                    )
        except MedtlInputError as e:
            problems.append((name, e.problem))
            continue
        groups[key].instances.append(Instance(name, ds, src, extra))
    for name, reason in problems:  # (a member's path may name the patient: the log has its key)
        log.warning("skipped %s: %s", name_key(name), reason)
    series = sorted(groups.values(), key=lambda s: (s.number, s.uid))
    return StudyListing(path=path, series=series, problems=problems)


def choose_series(
    listing: StudyListing, series_uid: str | None = None, modality: str | None = None
) -> tuple[Series, str]:
    """Pick the series to use by :data:`SERIES_RULES`; return it and the reason, in words."""
    candidates = [s for s in listing.series if s.instances[0].ds.get("Rows")]  # image objects only
    if not candidates:
        raise MedtlInputError(
            listing.path,
            f"no image series found ({len(listing.problems)} unreadable files)",
            "a folder or zip holding DICOM images",
        )
    if series_uid:
        match = [s for s in candidates if s.uid == series_uid]
        if not match:
            raise MedtlInputError(
                listing.path, f"series {series_uid} not found", "one of " + ", ".join(s.uid for s in candidates)
            )
        return match[0], "chosen by the user (series_uid)"
    reasons = []
    if modality:
        kept = [s for s in candidates if s.modality == modality.upper()]
        if not kept:
            raise MedtlInputError(
                listing.path,
                f"no {modality} series",
                "one of the modalities " + ", ".join(sorted({s.modality for s in candidates})),
            )
        candidates = kept
        reasons.append(f"modality {modality.upper()}")
    primary = [s for s in candidates if not any(t in s.image_type.upper() for t in _EXCLUDED_TYPES)]
    if primary and len(primary) < len(candidates):
        reasons.append(f"{len(candidates) - len(primary)} localizer/projection series left out")
        candidates = primary
    best = max(candidates, key=lambda s: (s.n_slices > 1, s.n_slices, -s.number))
    reasons.append(
        f"most slices ({best.n_slices}) of {len(candidates)} candidate series"
        if len(candidates) > 1
        else "the only candidate series"
    )
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
    scan.header = {
        **scan.header,
        "series": series.describe(),
        "series_choice": reason,
        "series_found": len(listing.series),
        "files_skipped": len(listing.problems),
    }
    scan.notes.insert(0, f"series {series.number} used: {reason}")
    return scan


def read_instances(series: Series, path: Path) -> Scan:
    """Decode and stack the instances of one series, sorted along the slice normal.

    The whole series is checked against the memory budget from its headers before any pixel
    is decoded.
    """
    with reading(path, f"DICOM series {series.number}"):
        needed = sum(declared_bytes(inst.ds, Path(inst.name))[1] for inst in series.instances)
        stacked = (
            sum(int(inst.ds.get("Rows", 0) or 0) * int(inst.ds.get("Columns", 0) or 0) for inst in series.instances) * 4
        )
        read_limits().check(path, needed + stacked, f"series {series.number} ({len(series.instances)} files)")
        return _stack(series, path)


def _stack(series: Series, path: Path) -> Scan:
    scans = [dataset_to_scan(inst.ds, Path(inst.name)) for inst in series.instances]
    if len(scans) == 1:
        scan = scans[0]
        scan.path, scan.source = path, "dicom-series"
        return scan
    if any(s.array.ndim != 2 for s in scans):
        raise CorruptImageError(
            path,
            f"series {series.number} holds {len(scans)} instances that are each a volume "
            "(multi-frame or mosaic: time points or repeats)",
            "one of its files, read alone",
        )
    found = [image_orientation(inst.ds, 0, Path(inst.name)) for inst in series.instances]
    iops = [i for i in found if i is not None]
    positions = [inst.ds.get("ImagePositionPatient") for inst in series.instances]
    if len(iops) < len(found) or any(p is None or len(p) != 3 for p in positions):
        raise CorruptImageError(
            path,
            f"series {series.number}: slices lack ImagePositionPatient/"
            "ImageOrientationPatient, so their order and spacing are unknown",
            "a series with patient geometry, or read the files one by one",
        )
    if any(not np.allclose(i, iops[0], atol=1e-3) for i in iops):
        raise CorruptImageError(path, f"series {series.number}: slices have different orientations")
    order, pos, spacing = sort_along_normal(
        [np.array([float(v) for v in p]) for p in positions], iops[0], path, f"series {series.number}"
    )
    if any(s.array.shape != scans[0].array.shape for s in scans):
        raise CorruptImageError(path, f"series {series.number}: slices of different sizes")
    pix = [s.spacing for s in scans]
    if any(not np.allclose(p, pix[0], rtol=1e-3) for p in pix):
        raise CorruptImageError(path, f"series {series.number}: slices have different pixel spacings")
    array = np.stack([scans[i].array for i in order])
    padding = None
    if any(s.padding is not None for s in scans):
        padding = np.stack(
            [scans[i].padding if scans[i].padding is not None else np.zeros(scans[i].array.shape, bool) for i in order]
        )
        array[padding] = array[~padding].min()  # one background for the whole volume
    rgb = np.stack([scans[i].rgb for i in order]) if all(s.rgb is not None for s in scans) else None
    first = scans[order[0]]
    notes = sorted({n for s in scans for n in s.notes})
    return Scan(
        array=array,
        spacing=(spacing, *first.spacing),
        modality=first.modality,
        source="dicom-series",
        path=path,
        units=first.units,
        header=first.header,
        window=first.window,
        orientation=orientation_letters(iops[0], volume=True),
        slice_positions=pos,
        notes=notes,
        voi=first.voi,
        padding=padding,
        rgb=rgb,
        value_max=first.value_max,
    )
