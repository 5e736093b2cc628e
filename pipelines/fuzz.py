"""Fuzz medtl's readers: every mutated file must be read, or refused with a typed error, in budget.

    python pipelines/fuzz.py [--n 10000] [--seed 0] [--jobs 2] [--budget 2G] [--timeout 10]
        [--data ../shared/data] [--seeds generated|data|both] [--out results/fuzz] [--keep-failures]
    python pipelines/fuzz.py --replay results/fuzz/failures.jsonl [--out DIR]   # re-run recorded mutants

Seeds are small files made here (DICOM: CT slices, an RGB, a deflated and a multi-frame object;
NIfTI .nii and .nii.gz; grey, RGB and 16-bit PNG, JPEG and TIFF; a zipped 4-slice CT series) and, with
the data folder (--data, default $MEDTL_SHARED_DATA, else ../shared/data), every DICOM, NIfTI and
picture file in it (DICOMDIR and .npz left out) plus a zip of each of its DICOM series folders.
--seeds chooses them (default: both where the data folder exists, else generated).

Mutant i of run seed S is made deterministically from (S, i): a seed kind, a seed file and a
mutator are drawn, and the mutator draws its edits from its own random stream. Its recipe
(seed, mutator, S, i) regenerates it byte for byte (--replay). Mutator families:
  bytes    bit flips (1-64), 0x00/0xFF runs, truncation (anywhere, and inside the first
           132-2048 bytes), chunk duplication/deletion, appended garbage
  dicom    element lengths made huge, VRs swapped, transfer syntax swapped (another syntax, a
           non-UID, deflate without deflating), nested sequences up to 1000 deep, Rows/Columns
           0/1/65535, BitsAllocated/BitsStored/HighBit, NumberOfFrames, SamplesPerPixel,
           PhotometricInterpretation, MOSAIC and CSA headers, garbage spacing/geometry/rescale/
           window strings, empty/short/long pixel data, required elements removed
  nifti    dim, pixdim, datatype, bitpix, vox_offset, scl_slope/inter, qform/sform and quaternions,
           sizeof_hdr, magic, truncation (a .nii.gz is edited decompressed and recompressed),
           broken gzip streams
  picture  PNG chunk lengths, IHDR size/depth/colour type (CRC recomputed), bad CRCs, damaged
           IDAT, dropped chunks; JPEG markers and segments; TIFF IFD entries, strips, IFD loops
  zip      a member mutated as DICOM, 20,000 tiny members, a member declaring a huge size, deep
           directories, '../' and absolute names, duplicate names, non-DICOM members
  bomb     (rare) a deflated DICOM declaring 16384x16384x4 frames of zeros, a zip member and a
           .nii.gz that inflate to GiBs, a PNG of up to 30000x30000 zeros
DICOM edits are made on the encoded elements (tag, VR, length, value), so values pydicom would
refuse to write (a DS of 'abc', a length of 0xFFFFFFFE) are written all the same.

Each mutant is written to a temporary file and read by ``medtl.io.read_image`` in a fresh child
process, forked from a warm server process (one per job) that has imported the readers. The child
has the budget as medtl's read limit (MEDTL_MAX_INPUT_BYTES), an address-space limit of its size
plus twice the budget, and is killed after --timeout seconds. Outcomes:
  read     a Scan came back
  typed    a MedtlInputError subclass (its class is counted)
  other    any other exception: its type, first line and innermost medtl file:line are kept
  timeout  killed after --timeout seconds
  killed   the child died: a signal, an exit status, or no result
Peak memory is the growth of the child's max RSS during the read (ru_maxrss after minus before).

Prints a markdown table (rows per seed kind and per mutator family; outcome counts, peak MiB and
seconds of reading; a total row with the largest peak and the wall time), then the distinct
failure signatures. Writes OUT/summary.md, OUT/summary.json and OUT/failures.jsonl (recipe and
result of every other/timeout/killed or over-budget mutant) and OUT/results.jsonl (every mutant);
--keep-failures also copies the failing mutant files to OUT/failures/. Exit status 1 when any
mutant ended other, timeout or killed, or a peak went over the budget, else 0 (so CI can run it).

Imported (as tests/io/test_fuzz.py does): ``run(n, seed, jobs, budget, timeout, seeds, out=...)``
returns the report (``format_report`` prints it); ``plan`` and ``make_mutant`` make a recipe and
regenerate its bytes; ``Server(reader, budget).read(path, timeout)`` classifies one file, with any
``module:function`` as the reader.
"""

import argparse
import gzip
import io
import json
import math
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HARNESS = Path(__file__).resolve()
ROOT = HARNESS.parents[1]
KINDS = ("dicom", "nifti", "picture", "zip")
FAMILIES = ("bytes", "dicom", "nifti", "picture", "zip", "bomb")
OUTCOMES = ("read", "typed", "other", "timeout", "killed")
BAD = ("other", "timeout", "killed")
DEFAULT_READER = "medtl.io:read_image"
KIND_WEIGHTS = {"dicom": 0.4, "nifti": 0.2, "picture": 0.2, "zip": 0.2}
FAMILY_WEIGHTS = (("bytes", 0.30), ("format", 0.67), ("bomb", 0.03))  # "format": the kind's own family
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------- seeds

@dataclass(frozen=True)
class Seed:
    """A file mutants are made from."""

    id: str  # "gen:<name>" or "data:<path relative to the data folder>"
    kind: str  # dicom, nifti, picture or zip
    suffix: str  # its name's suffix, kept by its mutants (readers look at names too)
    data: bytes


def _suffix(name: str) -> str:
    return name[-7:] if name.lower().endswith(".nii.gz") else Path(name).suffix


def _zip_bytes(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name, bytes) members, the same bytes every time (fixed dates)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # duplicate names are made on purpose
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED if name.endswith("/") else method
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buf.getvalue()


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(m.filename, z.read(m)) for m in z.infolist()]


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _new_dicom(sop_class: str, n: int, modality: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    uid = "1.2.826.0.1.3680043.10.1511.9.%d" % n  # fixed UIDs: the seeds are the same bytes every run
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid + ".1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid + ".1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid + ".2", uid + ".3"
    ds.PatientID, ds.Modality = "FUZZ", modality
    return ds


def _ct_slice(rng, size: int):
    """A CT-like slice in HU: air, a body ellipse, a brighter organ, noise."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    hu[(yy / 0.35) ** 2 + (xx / 0.42) ** 2 <= 1] = 40
    hu[((yy - 0.05) / 0.12) ** 2 + ((xx + 0.1) / 0.15) ** 2 <= 1] = 70
    return hu + rng.normal(0, 10, hu.shape)


def _ct_dicom(rng, size: int, n: int, index: int, series: int) -> bytes:
    """A CT Image Storage slice as a scanner writes it: 12 bits stored, rescale to HU, patient geometry."""
    import numpy as np
    from pydicom.uid import CTImageStorage

    ds = _new_dicom(CTImageStorage, n, "CT")
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1511.9.%d.3" % series
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1511.9.%d.2" % series
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber, ds.SeriesNumber = index + 1, 1
    ds.ImagePositionPatient = [-12.0, -12.0, 5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.75, 0.75], 5.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = np.clip(np.round(_ct_slice(rng, size) + 1024), 0, 4095).astype(np.uint16).tobytes()
    return _dicom_bytes(ds)


def generated_seeds() -> list[Seed]:
    """Small seed files of every kind the readers take, made here (the same bytes every run)."""
    import nibabel as nib
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage

    seeds: list[Seed] = []

    def add(name: str, kind: str, data: bytes) -> None:
        seeds.append(Seed(f"gen:{name}", kind, _suffix(name), data))

    rng = np.random.default_rng(0)
    ct = _ct_dicom(rng, 32, 10, 0, 10)
    add("ct_slice.dcm", "dicom", ct)
    add("ct_slice_no_suffix", "dicom", _ct_dicom(rng, 32, 11, 1, 11))
    ds = pydicom.dcmread(io.BytesIO(ct))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    add("ct_deflated.dcm", "dicom", _dicom_bytes(ds))

    grey = ((np.add.outer(np.arange(24), np.arange(32)) * 5) % 256).astype(np.uint8)
    rgb = np.stack([grey, grey[::-1], 255 - grey], -1)
    ds = _new_dicom(SecondaryCaptureImageStorage, 1, "OT")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 24, 32, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    add("rgb.dcm", "dicom", _dicom_bytes(ds))
    ds = _new_dicom(MRImageStorage, 2, "MR")
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 16, 16, 3, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = (np.arange(3 * 16 * 16, dtype=np.uint16) % 4096).tobytes()
    add("multiframe.dcm", "dicom", _dicom_bytes(ds))

    vol = np.stack([_ct_slice(rng, 32) for _ in range(8)], -1).round().astype(np.int16)
    ct_volume = nib.Nifti1Image(vol, np.diag([0.75, 0.75, 3.0, 1.0]))
    ct_volume.header.set_xyzt_units("mm")
    add("ct_volume.nii.gz", "nifti", gzip.compress(ct_volume.to_bytes(), 6, mtime=0))
    small = nib.Nifti1Image(np.arange(16 * 12 * 6, dtype=np.int16).reshape(16, 12, 6), np.diag([0.9, 0.8, 2.5, 1.0]))
    add("small.nii", "nifti", small.to_bytes())

    def picture(array, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, fmt, **kw)
        return buf.getvalue()

    add("grey.png", "picture", picture(grey, "PNG"))
    add("rgb.png", "picture", picture(rgb, "PNG"))
    add("grey16.png", "picture", picture((grey.astype(np.uint16) * 257), "PNG"))
    add("grey.jpg", "picture", picture(grey, "JPEG", quality=90))
    add("rgb.jpg", "picture", picture(rgb, "JPEG", quality=90))
    add("grey16.tif", "picture", picture((grey.astype(np.uint16) * 257), "TIFF"))
    add("rgb.tif", "picture", picture(rgb, "TIFF"))

    add("series.zip", "zip", _zip_bytes([(f"IM{k:04d}", _ct_dicom(rng, 32, 20 + k, k, 20)) for k in (2, 0, 3, 1)]))
    return seeds


def data_seeds(data: Path) -> list[Seed]:
    """Every DICOM and NIfTI file under data/dicom and data/nifti, pictures anywhere, and a zip per series folder."""
    from medtl.io.reader import sniff_format

    seeds = []
    for p in sorted(data.rglob("*")):
        rel = p.relative_to(data).as_posix()
        if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            continue
        if p.name.lower().endswith((".npz", ".md", ".txt", ".csv", ".json", ".zip")):
            continue
        try:
            kind = {"image": "picture"}.get(sniff_format(p), sniff_format(p))
        except Exception:  # not a kind read_image takes
            continue
        if kind != "picture" and rel.split("/")[0] not in ("dicom", "nifti"):
            continue
        seeds.append(Seed("data:" + rel, kind, _suffix(p.name), p.read_bytes()))
    series_root = data / "dicom" / "series"
    if series_root.is_dir():
        for d in sorted([series_root, *(q for q in series_root.rglob("*") if q.is_dir())]):
            files = sorted(q for q in d.rglob("*") if q.is_file() and q.name.upper() != "DICOMDIR")
            if files and sum(f.stat().st_size for f in files) <= 16 << 20:
                members = [(f.relative_to(d).as_posix(), f.read_bytes()) for f in files]
                seeds.append(Seed("data:" + d.relative_to(data).as_posix() + ".zip", "zip", ".zip",
                                  _zip_bytes(members)))
    return seeds


def default_data_dir() -> Path | None:
    if os.environ.get("MEDTL_SHARED_DATA"):
        return Path(os.environ["MEDTL_SHARED_DATA"])
    return ROOT.parent / "shared" / "data"


def load_seeds(which: str, data: Path | None = None) -> list[Seed]:
    """The seed files of a run: ``which`` is generated, data or both."""
    seeds = []
    if which in ("generated", "both"):
        seeds += generated_seeds()
    if which in ("data", "both"):
        if data is None or not Path(data).is_dir():
            from medtl.errors import FileMissingError

            raise FileMissingError(data, "data folder not found", "a folder with dicom/ and nifti/ (--data)")
        seeds += data_seeds(Path(data))
    return seeds


# ------------------------------------------------------------------------------------------ mutators

@dataclass(frozen=True)
class Mutator:
    name: str
    family: str
    kinds: tuple[str, ...]
    fn: object  # (data, rng, seed) -> (bytes, details)
    applies: object  # (seed) -> bool


MUTATORS: dict[str, Mutator] = {}


def mutator(family: str, kinds: tuple[str, ...], applies=None):
    def register(fn):
        MUTATORS[fn.__name__] = Mutator(fn.__name__, family, kinds, fn, applies or (lambda seed: True))
        return fn
    return register


def _plain(v):
    """A JSON-friendly form of a detail value (bytes and odd floats as text)."""
    if isinstance(v, bytes):
        return v[:64].decode("latin-1")
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# -- generic bytes --

@mutator("bytes", KINDS)
def bitflip(data, rng, seed):
    buf = bytearray(data)
    k = rng.randint(1, 64)
    offsets = sorted(rng.randrange(len(buf)) for _ in range(k))
    for off in offsets:
        buf[off] ^= 1 << rng.randrange(8)
    return bytes(buf), {"bits": k, "offsets": offsets[:8]}


@mutator("bytes", KINDS)
def byte_run(data, rng, seed):
    off, n, value = rng.randrange(len(data)), rng.choice([1, 4, 16, 64, 256, 4096]), rng.choice([0x00, 0xFF])
    buf = bytearray(data)
    buf[off:off + n] = bytes([value]) * len(buf[off:off + n])
    return bytes(buf), {"offset": off, "length": n, "value": value}


@mutator("bytes", KINDS)
def truncate(data, rng, seed):
    off = rng.randrange(len(data))
    return data[:off], {"at": off, "of": len(data)}


@mutator("bytes", KINDS)
def truncate_header(data, rng, seed):
    off = rng.randint(min(132, len(data) - 1), min(2048, len(data) - 1))
    return data[:off], {"at": off, "of": len(data)}


@mutator("bytes", KINDS)
def chunk_dup(data, rng, seed):
    a = rng.randrange(len(data))
    n = rng.randint(1, min(4096, len(data) - a))
    b = rng.randrange(len(data) + 1)
    return data[:b] + data[a:a + n] + data[b:], {"from": a, "length": n, "to": b}


@mutator("bytes", KINDS)
def chunk_del(data, rng, seed):
    a = rng.randrange(len(data))
    n = rng.randint(1, min(4096, len(data) - a))
    return data[:a] + data[a + n:], {"at": a, "length": n}


@mutator("bytes", KINDS)
def append_garbage(data, rng, seed):
    n = rng.choice([1, 7, 128, 4096, 65536])
    return data + rng.randbytes(n), {"length": n}


BYTE_MUTATORS = ("bitflip", "byte_run", "truncate", "truncate_header", "chunk_dup", "chunk_del", "append_garbage")


# -- DICOM: the encoded elements, edited in place --

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ITEM, ITEM_END, SEQ_END, UNDEFINED = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0xFFFFFFFF
TS_IMPLICIT, TS_EXPLICIT, TS_BIG, TS_DEFLATE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                                                "1.2.840.10008.1.2.1.99")
TS_CHOICES = (TS_IMPLICIT, TS_EXPLICIT, TS_BIG, TS_DEFLATE, "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57",
              "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
              "1.2.840.10008.1.2.5", "1.2.3.4.5.6", "abc", "", "1..2", "1.2.840.10008.1.2\\1.2.840.10008.1.2.1",
              "1.2.840.10008.1.2.1.99.1", "\x00\x01\x02")
TAGS = {"TransferSyntaxUID": 0x00020010, "ImageType": 0x00080008, "SOPClassUID": 0x00080016, "Modality": 0x00080060,
        "Manufacturer": 0x00080070, "SliceThickness": 0x00180050, "SpacingBetweenSlices": 0x00180088,
        "ImagerPixelSpacing": 0x00181164, "ImagePositionPatient": 0x00200032,
        "ImageOrientationPatient": 0x00200037, "SamplesPerPixel": 0x00280002,
        "PhotometricInterpretation": 0x00280004, "PlanarConfiguration": 0x00280006, "NumberOfFrames": 0x00280008,
        "Rows": 0x00280010, "Columns": 0x00280011, "PixelSpacing": 0x00280030, "BitsAllocated": 0x00280100,
        "BitsStored": 0x00280101, "HighBit": 0x00280102, "PixelRepresentation": 0x00280103,
        "WindowCenter": 0x00281050, "WindowWidth": 0x00281051, "RescaleIntercept": 0x00281052,
        "RescaleSlope": 0x00281053, "ContentSequence": 0x0040A730, "PixelData": 0x7FE00010}
VRS = {"TransferSyntaxUID": b"UI", "ImageType": b"CS", "SOPClassUID": b"UI", "Modality": b"CS", "Manufacturer": b"LO",
       "SamplesPerPixel": b"US", "PhotometricInterpretation": b"CS", "PlanarConfiguration": b"US",
       "NumberOfFrames": b"IS", "Rows": b"US", "Columns": b"US", "BitsAllocated": b"US", "BitsStored": b"US",
       "HighBit": b"US", "PixelRepresentation": b"US", "ContentSequence": b"SQ", "PixelData": b"OB"}
GARBAGE_FIELDS = ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope", "RescaleIntercept",
                  "WindowCenter", "WindowWidth", "SliceThickness", "SpacingBetweenSlices", "ImagerPixelSpacing")
GARBAGE_VALUES = ("abc", "1\\2\\3", "nan", "1e400", "-inf", "", "0", "0\\0", "1\\0\\0\\0\\0", "-1\\-1",
                  "1\\2\\3\\4\\5\\6\\7", "1e308\\1e308", " \\ ", "nan\\nan\\nan\\nan\\nan\\nan", "0\\0\\0\\0\\0\\0")


@dataclass
class Elem:
    tag: int
    vr: bytes | None
    start: int  # first byte of the tag
    len_pos: int  # where its length is written
    len_size: int  # 2 or 4 bytes
    value: int  # first byte of the value
    end: int  # just past the element (past the delimiter for undefined lengths)
    length: int  # as written


def _read_elem(buf: bytes, pos: int, explicit: bool, little: bool, depth: int = 0) -> Elem:
    e = "<" if little else ">"
    if pos + 8 > len(buf):
        raise ValueError(f"element at {pos} truncated")
    group, element = struct.unpack_from(e + "HH", buf, pos)
    tag = group << 16 | element
    if group == 0xFFFE or not explicit:
        vr, len_pos, size = None, pos + 4, 4
    else:
        vr = bytes(buf[pos + 4:pos + 6])
        len_pos, size = (pos + 8, 4) if vr in LONG_VRS else (pos + 6, 2)
    length = struct.unpack_from(e + ("I" if size == 4 else "H"), buf, len_pos)[0]
    value = len_pos + size
    if length == UNDEFINED and size == 4:
        end = _skip_undefined(buf, value, explicit, little, depth + 1)
    else:
        end = value + length
        if end > len(buf):
            raise ValueError(f"element {tag:08X} runs past the end")
    return Elem(tag, vr, pos, len_pos, size, value, end, length)


def _skip_undefined(buf: bytes, pos: int, explicit: bool, little: bool, depth: int) -> int:
    """The offset just past the sequence delimiter that closes the undefined-length value at ``pos``."""
    if depth > 64:
        raise ValueError("sequences nested too deeply to walk")
    e = "<" if little else ">"
    while True:
        if pos + 8 > len(buf):
            raise ValueError("undefined-length value without its delimiter")
        group, element, length = struct.unpack_from(e + "HHI", buf, pos)
        tag = group << 16 | element
        if tag == SEQ_END:
            return pos + 8
        if tag != ITEM:
            raise ValueError(f"{tag:08X} where an item was expected")
        pos += 8
        if length != UNDEFINED:
            pos += length
            continue
        while True:
            if pos + 8 > len(buf):
                raise ValueError("item without its delimiter")
            if struct.unpack_from(e + "HH", buf, pos) == (0xFFFE, 0xE00D):
                pos += 8
                break
            pos = _read_elem(buf, pos, explicit, little, depth + 1).end


def _walk(buf: bytes, explicit: bool, little: bool, start: int = 0, group: int | None = None) -> list[Elem]:
    """The top-level elements of ``buf`` from ``start`` (stopping at the first of another group, if given)."""
    out, pos = [], start
    while pos + 8 <= len(buf):
        if group is not None and struct.unpack_from("<H", buf, pos)[0] != group:
            break
        el = _read_elem(buf, pos, explicit, little)
        out.append(el)
        pos = el.end
    return out


def _encode(tag: int, vr: bytes | None, value: bytes, explicit: bool = True, little: bool = True,
            length: int | None = None) -> bytes:
    """One element's bytes; ``length`` overrides the written length (UNDEFINED for a delimited value)."""
    e = "<" if little else ">"
    if length is None and len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB", b"UN", None) else b" "
    n = len(value) if length is None else length
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if not explicit or vr is None or tag >> 16 == 0xFFFE:
        return head + struct.pack(e + "I", n) + value
    if vr in LONG_VRS or n > 0xFFFF:
        return head + (vr if vr in LONG_VRS else b"UN") + b"\0\0" + struct.pack(e + "I", n) + value
    return head + vr + struct.pack(e + "H", n) + value


def _value_bytes(vr: bytes, value, little: bool = True) -> bytes:
    e = "<" if little else ">"
    if vr in (b"US", b"SS", b"UL", b"SL"):  # unsigned values wrap (-1 is written as 0xFFFF)
        fmt, mask = {b"US": ("H", 0xFFFF), b"SS": ("h", None), b"UL": ("I", 0xFFFFFFFF), b"SL": ("i", None)}[vr]
        values = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack(e + fmt, int(v) & mask if mask else int(v)) for v in values)
    if isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


@dataclass
class DicomFile:
    """A DICOM file split into preamble, file meta group and body (inflated when deflated)."""

    prefix: bytes
    meta: bytes
    body: bytes
    raw_body: bytes  # the body as stored (still deflated)
    ts: str
    explicit: bool
    little: bool
    deflated: bool

    @classmethod
    def parse(cls, data: bytes) -> "DicomFile":
        pos = 132 if len(data) >= 132 and data[128:132] == b"DICM" else 0
        meta_elems = _walk(data, True, True, pos, group=2)
        meta_end = meta_elems[-1].end if meta_elems else pos
        ts = ""
        for el in meta_elems:
            if el.tag == TAGS["TransferSyntaxUID"]:
                ts = data[el.value:el.end].rstrip(b"\0 ").decode("latin-1")
        raw_body = data[meta_end:]
        if not ts:  # no file meta: guess the encoding as pydicom does, from the first element's VR
            ts = TS_EXPLICIT if raw_body[4:6].isalpha() and raw_body[4:6].isupper() else TS_IMPLICIT
        deflated = ts == TS_DEFLATE
        body = zlib.decompress(raw_body, -15) if deflated else raw_body
        return cls(data[:pos], data[pos:meta_end], body, raw_body, ts, ts != TS_IMPLICIT, ts != TS_BIG, deflated)

    def meta_elems(self) -> list[Elem]:
        return _walk(self.meta, True, True)

    def body_elems(self) -> list[Elem]:
        return _walk(self.body, self.explicit, self.little)

    def find(self, name: str) -> Elem | None:
        return next((el for el in self.body_elems() if el.tag == TAGS[name]), None)

    def get_int(self, name: str, default: int = 0) -> int:
        el = self.find(name)
        if el is None or el.end - el.value < 2:
            return default
        if el.vr in (b"IS", b"DS"):
            return int(float(self.body[el.value:el.end].strip(b"\0 ")))
        return struct.unpack_from("<H" if self.little else ">H", self.body, el.value)[0]

    def put(self, name: str, value, vr: bytes | None = None) -> None:
        """Set a body element (keeping its VR when present), or insert it in tag order."""
        tag = TAGS[name]
        el = self.find(name)
        vr = (el.vr if el is not None and el.vr else None) or vr or VRS.get(name, b"DS")
        raw = _value_bytes(vr, value, self.little) if not isinstance(value, bytes) else value
        self.put_raw(tag, _encode(tag, vr, raw, self.explicit, self.little))

    def put_raw(self, tag: int, encoded: bytes) -> None:
        elems = self.body_elems()
        el = next((x for x in elems if x.tag == tag), None)
        if el is not None:
            self.body = self.body[:el.start] + encoded + self.body[el.end:]
            return
        at = next((x.start for x in elems if x.tag > tag), len(self.body))
        self.body = self.body[:at] + encoded + self.body[at:]

    def remove(self, name: str) -> bool:
        el = self.find(name)
        if el is None:
            return False
        self.body = self.body[:el.start] + self.body[el.end:]
        return True

    def set_meta(self, meta: bytes) -> None:
        """Replace the file meta group, with its group length recomputed."""
        if len(meta) >= 12 and meta[:4] == b"\x02\x00\x00\x00":
            meta = meta[:8] + struct.pack("<I", len(meta) - 12) + meta[12:]
        self.meta = meta

    def to_bytes(self, deflate: bool | None = None) -> bytes:
        deflate = self.deflated if deflate is None else deflate
        body = self.body
        if deflate:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = c.compress(body) + c.flush()
        return self.prefix + self.meta + body


def _dcm(data) -> DicomFile:
    return DicomFile.parse(data)


@mutator("dicom", ("dicom",))
def dcm_huge_length(data, rng, seed):
    d = _dcm(data)
    where, elems = "body", d.body_elems()
    if not elems or rng.random() < 0.15:
        where, elems = "meta", d.meta_elems()
    pixel = [el for el in elems if el.tag == TAGS["PixelData"]]
    el = pixel[0] if pixel and rng.random() < 0.3 else rng.choice(elems)
    buf = bytearray(d.body if where == "body" else d.meta)
    if el.len_size == 4:
        new = rng.choice([0xFFFFFFFE, 0x7FFFFFFF, 0xFFFFFFF0, len(buf) + rng.randint(1, 1 << 20)])
        fmt = "I"
    else:
        new = rng.choice([0xFFFF, 0xFFFE, min(0xFFFF, el.length + rng.randint(1, 512))])
        fmt = "H"
    little = d.little if where == "body" else True
    struct.pack_into(("<" if little else ">") + fmt, buf, el.len_pos, new)
    if where == "body":
        d.body = bytes(buf)
    else:
        d.meta = bytes(buf)
    return d.to_bytes(), {"where": where, "tag": f"{el.tag:08X}", "vr": el.vr, "length": el.length, "new": new}


@mutator("dicom", ("dicom",))
def dcm_vr_swap(data, rng, seed):
    d = _dcm(data)
    where = "body" if d.explicit and rng.random() < 0.85 else "meta"
    elems = [el for el in (d.body_elems() if where == "body" else d.meta_elems()) if el.vr]
    el = rng.choice(elems)
    new = rng.choice([v for v in (b"ZZ", b"\0\0", b"SQ", b"OB", b"OW", b"UN", b"US", b"DS", b"UT", b"AT", b"FD",
                                  b"UL", b"ox") if v != el.vr])
    buf = bytearray(d.body if where == "body" else d.meta)
    buf[el.start + 4:el.start + 6] = new
    if where == "body":
        d.body = bytes(buf)
    else:
        d.meta = bytes(buf)
    return d.to_bytes(), {"where": where, "tag": f"{el.tag:08X}", "vr": el.vr, "new": new}


@mutator("dicom", ("dicom",))
def dcm_ts_swap(data, rng, seed):
    """A new transfer syntax in the file meta; the body is left as it was encoded (and compressed)."""
    d = _dcm(data)
    new = rng.choice([t for t in TS_CHOICES if t != d.ts])
    tag = TAGS["TransferSyntaxUID"]
    meta = d.meta
    encoded = _encode(tag, b"UI", new.encode("latin-1"))
    el = next((x for x in d.meta_elems() if x.tag == tag), None)
    if el is not None:
        meta = meta[:el.start] + encoded + meta[el.end:]
    else:
        at = next((x.start for x in d.meta_elems() if x.tag > tag), len(meta))
        meta = meta[:at] + encoded + meta[at:]
    d.set_meta(meta)
    return d.prefix + d.meta + d.raw_body, {"from": d.ts, "to": new}


def _nested_sequence(depth: int, explicit: bool, little: bool, undefined: bool) -> bytes:
    e = "<" if little else ">"
    tag = TAGS["ContentSequence"]
    inner = _encode(0x00080100, b"SH", b"FUZZ", explicit, little)
    for _ in range(depth):
        if undefined:
            item = struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEFINED) + inner + struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
            inner = _encode(tag, b"SQ", item + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0), explicit, little,
                            length=UNDEFINED)
        else:
            item = struct.pack(e + "HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = _encode(tag, b"SQ", item, explicit, little)
    return inner


@mutator("dicom", ("dicom",))
def dcm_nested_seq(data, rng, seed):
    d = _dcm(data)
    depth, undefined = rng.choice([20, 200, 200, 500, 1000]), rng.random() < 0.5
    d.put_raw(TAGS["ContentSequence"], _nested_sequence(depth, d.explicit, d.little, undefined))
    return d.to_bytes(), {"depth": depth, "undefined_length": undefined}


@mutator("dicom", ("dicom",))
def dcm_rows_cols(data, rng, seed):
    d = _dcm(data)
    which, value = rng.choice(["Rows", "Columns", "both"]), rng.choice([0, 1, 65535])
    for name in (["Rows", "Columns"] if which == "both" else [which]):
        d.put(name, value)
    return d.to_bytes(), {"field": which, "value": value}


@mutator("dicom", ("dicom",))
def dcm_bits(data, rng, seed):
    d = _dcm(data)
    variant = rng.choice(["allocated", "stored_over_allocated", "high_bit", "pixel_representation"])
    if variant == "allocated":
        name, value = "BitsAllocated", rng.choice([0, 1, 7, 12, 64])
    elif variant == "stored_over_allocated":
        name, value = "BitsStored", d.get_int("BitsAllocated", 16) + rng.randint(1, 8)
    elif variant == "high_bit":
        name, value = "HighBit", rng.choice([0, 63, 255])
    else:
        name, value = "PixelRepresentation", rng.choice([2, 65535])
    d.put(name, value)
    return d.to_bytes(), {"field": name, "value": value}


@mutator("dicom", ("dicom",))
def dcm_frames(data, rng, seed):
    d = _dcm(data)
    value = rng.choice(["0", "-1", "abc", "100000", "1.5", "", "1e9", "2147483648", " "])
    d.put("NumberOfFrames", value)
    return d.to_bytes(), {"NumberOfFrames": value}


@mutator("dicom", ("dicom",))
def dcm_samples(data, rng, seed):
    d = _dcm(data)
    variant = rng.choice(["3_with_monochrome2", "samples", "planar"])
    if variant == "3_with_monochrome2":
        d.put("SamplesPerPixel", 3)
        d.put("PhotometricInterpretation", "MONOCHROME2")
        return d.to_bytes(), {"SamplesPerPixel": 3, "PhotometricInterpretation": "MONOCHROME2"}
    if variant == "samples":
        value = rng.choice([0, 4, 65535])
        d.put("SamplesPerPixel", value)
        return d.to_bytes(), {"SamplesPerPixel": value}
    value = rng.choice([1, 7])
    d.put("PlanarConfiguration", value)
    return d.to_bytes(), {"PlanarConfiguration": value}


@mutator("dicom", ("dicom",))
def dcm_photometric(data, rng, seed):
    d = _dcm(data)
    value = rng.choice(["PALETTE COLOR", "YBR_FULL_422", "YBR_FULL", "RGB", "MONOCHROME1", "YBR_ICT", "ABC", "",
                        "MONOCHROME2\\RGB"])
    d.put("PhotometricInterpretation", value)
    removed = []
    if value == "PALETTE COLOR":  # without its lookup tables
        for tag in (0x00281101, 0x00281102, 0x00281103, 0x00281201, 0x00281202, 0x00281203):
            el = next((x for x in d.body_elems() if x.tag == tag), None)
            if el is not None:
                d.body = d.body[:el.start] + d.body[el.end:]
                removed.append(f"{tag:08X}")
    return d.to_bytes(), {"PhotometricInterpretation": value, "removed": removed}


@mutator("dicom", ("dicom",))
def dcm_mosaic(data, rng, seed):
    d = _dcm(data)
    csa = [el for el in d.body_elems() if el.tag >> 16 == 0x0029 and (el.tag & 0xFF) in (0x10, 0x20)
           and el.end - el.value > 16]
    variant = rng.choice(["mark", "mark_siemens"] + (["csa_bytes", "csa_truncate"] if csa else []))
    if variant.startswith("mark"):
        d.put("ImageType", "ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC")
        if variant == "mark_siemens":
            d.put("Manufacturer", "SIEMENS")
        return d.to_bytes(), {"variant": variant}
    el = rng.choice(csa)
    value = bytearray(d.body[el.value:el.end])
    if variant == "csa_bytes":
        for _ in range(rng.randint(1, 16)):
            off = rng.randrange(len(value))
            value[off] = rng.choice([0x00, 0xFF, rng.randrange(256)])
    else:
        value = value[:rng.randrange(8, len(value))]
    d.put_raw(el.tag, _encode(el.tag, el.vr or b"OB", bytes(value), d.explicit, d.little))
    return d.to_bytes(), {"variant": variant, "tag": f"{el.tag:08X}"}


@mutator("dicom", ("dicom",))
def dcm_garbage_value(data, rng, seed):
    d = _dcm(data)
    name, value = rng.choice(GARBAGE_FIELDS), rng.choice(GARBAGE_VALUES)
    d.put(name, value, b"DS")
    return d.to_bytes(), {"field": name, "value": value}


@mutator("dicom", ("dicom",))
def dcm_pixeldata(data, rng, seed):
    d = _dcm(data)
    el = d.find("PixelData")
    if el is None:
        raise ValueError("no PixelData")
    vr = el.vr or b"OB"
    tag = TAGS["PixelData"]
    if el.length == UNDEFINED:  # encapsulated fragments
        variant = rng.choice(["empty", "fragment_length", "no_delimiter", "cut"])
        if variant == "empty":
            d.put_raw(tag, _encode(tag, vr, b"", d.explicit, d.little))
        elif variant == "fragment_length":  # the offset table's or a fragment's length made huge
            items, pos = [], el.value
            while pos + 8 <= el.end - 8:
                items.append(pos)
                pos += 8 + struct.unpack_from("<I", d.body, pos + 4)[0]
            at = rng.choice(items)
            buf = bytearray(d.body)
            struct.pack_into("<I", buf, at + 4, rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(buf)]))
            d.body = bytes(buf)
        elif variant == "no_delimiter":
            d.body = d.body[:el.end - 8] + d.body[el.end:]
        else:
            d.body = d.body[:rng.randrange(el.value, el.end)]
        return d.to_bytes(), {"encapsulated": True, "variant": variant}
    value = d.body[el.value:el.end]
    variant = rng.choice(["empty", "shorter", "longer", "odd"])
    if variant == "empty":
        new = b""
    elif variant == "shorter":
        new = value[:rng.randrange(max(1, len(value)))]
    elif variant == "longer":
        new = value + value[:rng.randint(1, max(1, len(value)))] + rng.randbytes(rng.choice([1, 2, 1000]))
    else:
        new = value[:-1]
    encoded = _encode(tag, vr, new, d.explicit, d.little, length=len(new))
    d.put_raw(tag, encoded)
    return d.to_bytes(), {"encapsulated": False, "variant": variant, "length": len(value), "new": len(new)}


@mutator("dicom", ("dicom",))
def dcm_remove(data, rng, seed):
    d = _dcm(data)
    names = [n for n in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation",
                         "SamplesPerPixel", "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "PixelSpacing",
                         "ImageOrientationPatient", "ImagePositionPatient", "SOPClassUID", "Modality",
                         "NumberOfFrames", "PixelData") if d.find(n) is not None]
    if rng.random() < 0.1 or not names:
        tag = TAGS["TransferSyntaxUID"]
        el = next((x for x in d.meta_elems() if x.tag == tag), None)
        if el is not None:
            d.set_meta(d.meta[:el.start] + d.meta[el.end:])
            return d.prefix + d.meta + d.raw_body, {"removed": "TransferSyntaxUID"}
    name = rng.choice(names)
    d.remove(name)
    return d.to_bytes(), {"removed": name}


# -- bombs: small files that inflate to GiBs --

ZERO_CHUNK = 64 << 20


@lru_cache(maxsize=None)
def _zero_segment() -> bytes:
    """Raw deflate of ZERO_CHUNK zeros ending at a full flush: repeating it deflates more zeros."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(bytes(ZERO_CHUNK)) + c.flush(zlib.Z_FULL_FLUSH)


@lru_cache(maxsize=None)
def _deflated_zeros(n: int) -> bytes:
    """A complete raw deflate stream of ``n`` zero bytes, made in milliseconds whatever ``n``."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return _zero_segment() * (n // ZERO_CHUNK) + c.compress(bytes(n % ZERO_CHUNK)) + c.flush()


def _deflated_then_zeros(head: bytes, n: int) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(head) + c.flush(zlib.Z_FULL_FLUSH) + _deflated_zeros(n)


@lru_cache(maxsize=64)
def _crc_zeros(crc: int, n: int) -> int:
    """crc32 continued over ``n`` zero bytes."""
    block = bytes(min(n, ZERO_CHUNK))
    while n:
        k = min(n, len(block))
        crc = zlib.crc32(block[:k] if k < len(block) else block, crc)
        n -= k
    return crc


@mutator("bomb", ("dicom",))
def dcm_deflate_bomb(data, rng, seed):
    """A deflated DICOM declaring 16384 x 16384 x 4 frames whose pixel data, all zeros, inflates to 1-2 GiB."""
    d = _dcm(data)
    bits = rng.choice([8, 16])
    rows = cols = 16384
    frames = 4
    n = rows * cols * frames * bits // 8
    skip = {TAGS[k] for k in ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit",
                              "SamplesPerPixel", "PhotometricInterpretation", "PixelRepresentation",
                              "PlanarConfiguration", "PixelData")}
    if d.explicit and d.little:  # the seed's own header, less its image description
        head = b"".join(d.body[el.start:el.end] for el in d.body_elems()
                        if el.tag not in skip and el.tag < TAGS["PixelData"])
    else:
        head = b""
    bomb = DicomFile(d.prefix, d.meta, head, b"", TS_EXPLICIT, True, True, False)
    for name, value in (("SamplesPerPixel", 1), ("PhotometricInterpretation", "MONOCHROME2"),
                        ("NumberOfFrames", str(frames)), ("Rows", rows), ("Columns", cols), ("BitsAllocated", bits),
                        ("BitsStored", bits), ("HighBit", bits - 1), ("PixelRepresentation", 0)):
        bomb.put(name, value)
    pixel_head = _encode(TAGS["PixelData"], b"OB" if bits == 8 else b"OW", b"", length=n)
    meta = d.meta
    tag = TAGS["TransferSyntaxUID"]
    el = next((x for x in _walk(meta, True, True) if x.tag == tag), None)
    encoded = _encode(tag, b"UI", TS_DEFLATE.encode())
    meta = meta[:el.start] + encoded + meta[el.end:] if el is not None else meta
    bomb.set_meta(meta)
    return bomb.prefix + bomb.meta + _deflated_then_zeros(bomb.body + pixel_head, n), {
        "rows": rows, "columns": cols, "frames": frames, "bits": bits, "inflated_bytes": n}


def _nifti_raw(data: bytes, seed: Seed) -> bytes:
    return gzip.decompress(data) if seed.suffix.lower().endswith(".gz") else data


def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, 1, mtime=0)


@mutator("bomb", ("nifti",))
def nii_gzip_bomb(data, rng, seed):
    """A .nii.gz whose header and stream agree on 1-2 GiB of zero voxels."""
    raw = _nifti_raw(data, seed)
    e = _nifti_endian(raw)
    shape, code, bitpix = rng.choice([((1024, 1024, 1024), 2, 8), ((1024, 1024, 512), 4, 16),
                                      ((2048, 1024, 256), 16, 32)])
    hdr = bytearray(raw[:348] + b"\0" * 4)
    struct.pack_into(e + "8h", hdr, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into(e + "hh", hdr, 70, code, bitpix)
    struct.pack_into(e + "f", hdr, 108, 352.0)
    struct.pack_into(e + "ff", hdr, 112, 1.0, 0.0)
    hdr[344:348] = b"n+1\0"
    n = shape[0] * shape[1] * shape[2] * bitpix // 8
    crc = _crc_zeros(zlib.crc32(bytes(hdr)), n)
    out = (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + _deflated_then_zeros(bytes(hdr), n)
           + struct.pack("<II", crc, (len(hdr) + n) & 0xFFFFFFFF))
    return out, {"shape": shape, "datatype": code, "inflated_bytes": n + len(hdr)}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@mutator("bomb", ("picture",))
def png_bomb(data, rng, seed):
    """A PNG of zeros whose IDAT inflates to (width + 1) x height bytes."""
    side = rng.choice([12000, 30000])
    n = (side + 1) * side
    idat = b"\x78\x9c" + _deflated_zeros(n) + struct.pack(">I", (n % 65521) << 16 | 1)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return png, {"width": side, "height": side, "inflated_bytes": n}


def _zip_entries(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip written by hand from (name, method, stored bytes, crc, uncompressed size)."""
    out, central = bytearray(), bytearray()
    for name, method, stored, crc, size in entries:
        fname = name.encode()
        head = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x5021, crc, len(stored), size, len(fname), 0)
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0x5021, crc, len(stored), size,
                               len(fname), 0, 0, 0, 0, 0o644 << 16, len(out)) + fname
        out += head + fname + stored
    eocd = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + eocd)


@mutator("bomb", ("zip",))
def zip_bomb(data, rng, seed):
    """The series plus one member of zeros that inflates to 1, 1.5 or 3.75 GiB (its sizes and CRC are true)."""
    n = rng.choice([1 << 30, 0x60000000, 0xF0000000])
    entries = [(name, 0, body, zlib.crc32(body), len(body)) for name, body in _zip_members(data)
               if not name.endswith("/")]
    at = rng.randint(0, len(entries))
    entries.insert(at, ("IM_BOMB", 8, _deflated_zeros(n), _crc_zeros(0, n), n))
    return _zip_entries(entries), {"inflated_bytes": n, "position": at}


# -- NIfTI header fields --

def _nifti_endian(raw: bytes) -> str:
    if struct.unpack_from("<i", raw, 0)[0] == 348:
        return "<"
    if struct.unpack_from(">i", raw, 0)[0] == 348:
        return ">"
    raise ValueError("not a NIfTI-1 header")


def _nifti_edit(data: bytes, seed: Seed, edit) -> tuple[bytes, dict]:
    gz = seed.suffix.lower().endswith(".gz")
    raw = _nifti_raw(data, seed)
    buf = bytearray(raw)
    details = edit(buf, _nifti_endian(raw))
    return (_gzip(bytes(buf)) if gz else bytes(buf)), details


def _is_gz(seed: Seed) -> bool:
    return seed.suffix.lower().endswith(".gz")


BITPIX = {1: 1, 2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
          1536: 128, 1792: 128, 2048: 256, 2304: 32}


@mutator("nifti", ("nifti",))
def nii_dim(data, rng, seed):
    def edit(buf, e):
        if rng.random() < 0.4:
            value = rng.choice([0, 8, -1, 15, 255])
            struct.pack_into(e + "h", buf, 40, value)
            return {"dim[0]": value}
        i, value = rng.randint(1, 7), rng.choice([0, -1, 32767, -32768, 2])
        struct.pack_into(e + "h", buf, 40 + 2 * i, value)
        return {f"dim[{i}]": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_pixdim(data, rng, seed):
    def edit(buf, e):
        i, value = rng.randint(0, 7), rng.choice([0.0, -1.0, NAN, INF, -INF, 1e38, 1e-38])
        struct.pack_into(e + "f", buf, 76 + 4 * i, value)
        return {f"pixdim[{i}]": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_datatype(data, rng, seed):
    def edit(buf, e):
        code = rng.choice([0, 2048, 9999, -1, 1, 32, 128, 1536, 2304, 1792, 255])
        matched = rng.random() < 0.5
        struct.pack_into(e + "h", buf, 70, code)
        if matched and code in BITPIX:
            struct.pack_into(e + "h", buf, 72, BITPIX[code])
        return {"datatype": code, "bitpix_matched": matched and code in BITPIX}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_bitpix(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([0, 1, 7, 13, 128, -8, 32767])
        struct.pack_into(e + "h", buf, 72, value)
        return {"bitpix": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_vox_offset(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([0.0, 348.0, 351.0, float(len(buf) + rng.randint(1, 1 << 20)), 1e20, -352.0, NAN, INF,
                            352.5])
        struct.pack_into(e + "f", buf, 108, value)
        return {"vox_offset": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_scaling(data, rng, seed):
    def edit(buf, e):
        field, value = rng.choice(["scl_slope", "scl_inter", "both"]), rng.choice([NAN, INF, -INF, 0.0, 1e38, -1e-38])
        for name in (["scl_slope", "scl_inter"] if field == "both" else [field]):
            struct.pack_into(e + "f", buf, 112 if name == "scl_slope" else 116, value)
        return {"field": field, "value": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_qsform(data, rng, seed):
    def edit(buf, e):
        variant = rng.choice(["qform_code", "sform_code", "quatern", "qoffset", "srow", "sform_zero"])
        if variant in ("qform_code", "sform_code"):
            value = rng.choice([-1, 5, 32767, 0, 1])
            struct.pack_into(e + "h", buf, 252 if variant == "qform_code" else 254, value)
            return {variant: value}
        if variant == "sform_zero":  # a valid sform code with a singular matrix
            struct.pack_into(e + "h", buf, 254, 1)
            struct.pack_into(e + "12f", buf, 280, *([0.0] * 12))
            return {"sform_code": 1, "srow": "zeros"}
        offset = {"quatern": 256 + 4 * rng.randrange(3), "qoffset": 268 + 4 * rng.randrange(3),
                  "srow": 280 + 4 * rng.randrange(12)}[variant]
        value = rng.choice([NAN, INF, 2.0, -5.0, 1e38])
        struct.pack_into(e + "f", buf, offset, value)
        if rng.random() < 0.5:
            struct.pack_into(e + "hh", buf, 252, 1, 1 if variant == "srow" else 0)
        return {"field": variant, "offset": offset, "value": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_sizeof_hdr(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([0, 347, 540, 1 << 24, -348, 349])
        struct.pack_into(e + "i", buf, 0, value)
        return {"sizeof_hdr": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_magic(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([b"n+2\0", b"ni1\0", b"\0\0\0\0", b"n+1\r", b"ni2\0", b"abcd"])
        buf[344:348] = value
        return {"magic": value}
    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_truncate(data, rng, seed):
    """Cut the (decompressed) file inside its header or its voxels; a .nii.gz is then a valid, short gzip."""
    raw = _nifti_raw(data, seed)
    at = rng.choice([rng.randrange(0, 348), rng.randrange(348, len(raw))])
    return (_gzip(raw[:at]) if _is_gz(seed) else raw[:at]), {"at": at, "of": len(raw)}


@mutator("nifti", ("nifti",), applies=_is_gz)
def nii_inner_bytes(data, rng, seed):
    """A generic byte mutation of the decompressed file, recompressed."""
    name = rng.choice(BYTE_MUTATORS)
    raw, details = MUTATORS[name].fn(gzip.decompress(data), rng, seed)
    return _gzip(raw), {"inner": name, **details}


@mutator("nifti", ("nifti",), applies=_is_gz)
def nii_gzip_stream(data, rng, seed):
    variant = rng.choice(["flip_stream", "bad_crc", "bad_size", "cut_stream", "second_member", "bad_flags",
                          "bad_method"])
    buf = bytearray(data)
    if variant == "flip_stream":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(10, len(buf) - 8)] ^= 1 << rng.randrange(8)
    elif variant == "bad_crc":
        buf[-8] ^= 0xFF
    elif variant == "bad_size":
        struct.pack_into("<I", buf, len(buf) - 4, rng.choice([0, 0xFFFFFFFF, 1 << 30]))
    elif variant == "cut_stream":
        buf = buf[:rng.randrange(10, len(buf) - 8)]
    elif variant == "second_member":
        buf += gzip.compress(rng.randbytes(rng.choice([1, 100, 5000])), 1, mtime=0)
    elif variant == "bad_flags":  # FEXTRA with a length running past the data
        buf[3] = 0x04
        buf[10:10] = struct.pack("<H", 0xFFFF)
    else:
        buf[2] = rng.choice([0, 7, 9])
    return bytes(buf), {"variant": variant}


# -- pictures --

def _is_png(seed):
    return seed.data.startswith(b"\x89PNG")


def _is_jpeg(seed):
    return seed.data.startswith(b"\xff\xd8")


def _is_tiff(seed):
    return seed.data[:4] in (b"II*\x00", b"MM\x00*")


def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 8
    while pos + 12 <= len(data):
        n, kind = struct.unpack_from(">I4s", data, pos)
        out.append((pos, n, kind))
        pos += 12 + n
    return out


def _fix_crc(buf: bytearray, pos: int) -> None:
    n = struct.unpack_from(">I", buf, pos)[0]
    struct.pack_into(">I", buf, pos + 8 + n, zlib.crc32(bytes(buf[pos + 4:pos + 8 + n])))


@mutator("picture", ("picture",), applies=_is_png)
def png_chunk_length(data, rng, seed):
    pos, n, kind = rng.choice(_png_chunks(data))
    new = rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 0, n + 1, n * 1000 + 1])
    buf = bytearray(data)
    struct.pack_into(">I", buf, pos, new)
    return bytes(buf), {"chunk": kind, "length": n, "new": new}


@mutator("picture", ("picture",), applies=_is_png)
def png_ihdr(data, rng, seed):
    buf = bytearray(data)
    variant = rng.choice(["size", "size", "depth", "colour", "interlace", "compression", "filter"])
    if variant == "size":
        w, h = rng.choice([(100000, 100000), (0, 10), (10, 0), (0x7FFFFFFF, 1), (1, 0x7FFFFFFF), (65535, 65535),
                           (0xFFFFFFFF, 0xFFFFFFFF)])
        struct.pack_into(">II", buf, 16, w, h)
        details = {"width": w, "height": h}
    else:
        offset = {"depth": 24, "colour": 25, "compression": 26, "filter": 27, "interlace": 28}[variant]
        value = rng.choice({"depth": [0, 3, 7, 32, 16, 1], "colour": [1, 5, 7, 3, 4, 6],
                            "compression": [1, 255], "filter": [1, 255], "interlace": [1, 2]}[variant])
        buf[offset] = value
        details = {variant: value}
    _fix_crc(buf, 8)
    return bytes(buf), details


@mutator("picture", ("picture",), applies=_is_png)
def png_bad_crc(data, rng, seed):
    pos, n, kind = rng.choice(_png_chunks(data))
    buf = bytearray(data)
    buf[pos + 8 + n + rng.randrange(4)] ^= rng.randint(1, 255)
    return bytes(buf), {"chunk": kind}


@mutator("picture", ("picture",), applies=_is_png)
def png_idat(data, rng, seed):
    """IDAT content damaged, short or long, with its CRC recomputed (only the zlib stream is wrong)."""
    chunks = _png_chunks(data)
    pos, n, kind = next(c for c in chunks if c[2] == b"IDAT")
    body = data[pos + 8:pos + 8 + n]
    variant = rng.choice(["flip", "short", "long", "not_zlib"])
    if variant == "flip":
        b = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        new = bytes(b)
    elif variant == "short":
        raw = zlib.decompress(body)
        new = zlib.compress(raw[:rng.randrange(len(raw))])
    elif variant == "long":
        raw = zlib.decompress(body)
        new = zlib.compress(raw + raw + rng.randbytes(100))
    else:
        new = rng.randbytes(len(body))
    chunk = _png_chunk(b"IDAT", new)
    return data[:pos] + chunk + data[pos + 12 + n:], {"variant": variant}


@mutator("picture", ("picture",), applies=_is_png)
def png_drop_chunk(data, rng, seed):
    chunks = _png_chunks(data)
    pos, n, kind = rng.choice(chunks)
    return data[:pos] + data[pos + 12 + n:], {"dropped": kind}


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int | None]]:
    """(offset, marker, length) of the segments up to and including the first SOS."""
    out, pos = [(0, 0xD8, None)], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            out.append((pos, marker, None))
            pos += 2
            continue
        n = struct.unpack_from(">H", data, pos + 2)[0]
        out.append((pos, marker, n))
        if marker == 0xDA:
            break
        pos += 2 + n
    return out


@mutator("picture", ("picture",), applies=_is_jpeg)
def jpeg_marker(data, rng, seed):
    segs = _jpeg_segments(data)
    buf = bytearray(data)
    sofs = [s for s in segs if s[1] in (0xC0, 0xC1, 0xC2)]
    variant = rng.choice(["marker", "length", "sof_size", "sof_components", "sof_precision", "table", "no_eoi",
                          "cut_scan", "double_soi"])
    if variant in ("sof_size", "sof_components", "sof_precision") and not sofs:
        variant = "marker"
    if variant == "marker":
        pos, marker, _ = rng.choice(segs[1:])
        new = rng.choice([0x00, 0xFF, 0xC3, 0xCF, 0xDB, 0xC4, 0xD9, 0x01, rng.randrange(256)])
        buf[pos + 1] = new
        return bytes(buf), {"variant": variant, "marker": f"{marker:02X}", "new": f"{new:02X}"}
    if variant == "length":
        pos, marker, n = rng.choice([s for s in segs if s[2] is not None])
        new = rng.choice([0, 1, 2, 0xFFFF, n + 1, n - 1])
        struct.pack_into(">H", buf, pos + 2, new)
        return bytes(buf), {"variant": variant, "marker": f"{marker:02X}", "length": n, "new": new}
    if variant.startswith("sof"):
        pos = sofs[0][0]
        if variant == "sof_size":
            h, w = rng.choice([(0, 16), (16, 0), (65535, 65535), (0, 0), (65535, 1)])
            struct.pack_into(">HH", buf, pos + 5, h, w)
            return bytes(buf), {"variant": variant, "height": h, "width": w}
        offset, value = (pos + 9, rng.choice([0, 255, 4, 2])) if variant == "sof_components" else \
            (pos + 4, rng.choice([0, 12, 16, 255]))
        buf[offset] = value
        return bytes(buf), {"variant": variant, "value": value}
    if variant == "table":
        tables = [s for s in segs if s[1] in (0xC4, 0xDB)] or segs[1:]
        pos, marker, n = rng.choice(tables)
        for _ in range(rng.randint(1, 6)):
            buf[pos + 4 + rng.randrange(max(1, (n or 2) - 2))] = rng.randrange(256)
        return bytes(buf), {"variant": variant, "marker": f"{marker:02X}"}
    if variant == "no_eoi":
        return data[:-2] if data.endswith(b"\xff\xd9") else data[:-1], {"variant": variant}
    if variant == "cut_scan":
        start = segs[-1][0] + 4
        return data[:rng.randrange(start, len(data))], {"variant": variant}
    return data[:2] + b"\xff\xd8" + data[2:], {"variant": variant}


def _tiff_ifd(data: bytes) -> tuple[str, int, list[tuple[int, int, int, int]]]:
    e = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(e + "I", data, 4)[0]
    n = struct.unpack_from(e + "H", data, ifd)[0]
    entries = [(ifd + 2 + 12 * i, *struct.unpack_from(e + "HHI", data, ifd + 2 + 12 * i)) for i in range(n)]
    return e, ifd, entries


@mutator("picture", ("picture",), applies=_is_tiff)
def tiff_ifd(data, rng, seed):
    e, ifd, entries = _tiff_ifd(data)
    buf = bytearray(data)
    variant = rng.choice(["value", "value", "value", "entry_count", "ifd_loop", "ifd_offset", "entry_type",
                          "entry_count_huge"])
    if variant == "value":
        choices = {256: [0, 0xFFFF, 100000, 0xFFFFFFFF], 257: [0, 0xFFFF, 100000, 0xFFFFFFFF], 258: [0, 3, 64, 255],
                   259: [0, 7, 99, 65535, 5], 262: [99, 3, 5], 273: [len(data) + 10, 0xFFFFFFF0, 0],
                   277: [0, 1000, 4], 278: [0, 0xFFFFFFFF], 279: [0, 0xFFFFFFFF, len(data) * 10], 284: [2, 0, 9]}
        editable = [en for en in entries if en[1] in choices]
        pos, tag, typ, count = rng.choice(editable)
        value = rng.choice(choices[tag])
        if count == 1 and typ == 3:
            struct.pack_into(e + "HH", buf, pos + 8, value & 0xFFFF, 0)
        else:  # a LONG, or the offset of the values
            struct.pack_into(e + "I", buf, pos + 8, value & 0xFFFFFFFF)
        return bytes(buf), {"variant": variant, "tag": tag, "value": value, "count": count}
    if variant == "entry_count":
        value = rng.choice([0, 0xFFFF, len(entries) + 3])
        struct.pack_into(e + "H", buf, ifd, value)
        return bytes(buf), {"variant": variant, "value": value}
    next_pos = ifd + 2 + 12 * len(entries)
    if variant == "ifd_loop":  # the next IFD is this one again
        struct.pack_into(e + "I", buf, next_pos, ifd)
        return bytes(buf), {"variant": variant}
    if variant == "ifd_offset":
        value = rng.choice([0, 1, len(data) + 100, 0xFFFFFFFF])
        which = rng.choice(["first", "next"])
        struct.pack_into(e + "I", buf, 4 if which == "first" else next_pos, value)
        return bytes(buf), {"variant": variant, "which": which, "value": value}
    pos = rng.choice(entries)[0]
    if variant == "entry_type":
        value = rng.choice([0, 13, 99, 12])
        struct.pack_into(e + "H", buf, pos + 2, value)
    else:
        value = rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 1 << 20])
        struct.pack_into(e + "I", buf, pos + 4, value)
    return bytes(buf), {"variant": variant, "value": value}


# -- zips of DICOM series --

@mutator("zip", ("zip",))
def zip_member(data, rng, seed):
    """One member mutated as a DICOM file (or by a generic byte mutator), the zip rebuilt."""
    members = [m for m in _zip_members(data) if not m[0].endswith("/")]
    k = rng.randrange(len(members))
    name, body = members[k]
    families = [m for m in MUTATORS.values() if m.family == "dicom"] if rng.random() < 0.75 else \
        [MUTATORS[n] for n in BYTE_MUTATORS]
    inner = rng.choice(families)
    member_seed = Seed(f"{seed.id}!{name}", "dicom", _suffix(name), body)
    new, details = inner.fn(body, rng, member_seed)
    members[k] = (name, new)
    return _zip_bytes(members), {"member": name, "inner": inner.name, **{f"inner_{a}": b for a, b in details.items()}}


@mutator("zip", ("zip",))
def zip_many_members(data, rng, seed):
    """Two of the series' files and thousands of tiny members."""
    count = rng.choice([20000, 6000])
    members = [(name, body) for name, body in _zip_members(data)[:2]]
    members += [(f"tiny/{i // 1000:02d}/IM{i:05d}.dcm", b"\0" * (i % 17)) for i in range(count)]
    return _zip_entries([(name, 0, body, zlib.crc32(body), len(body)) for name, body in members]), {"members": count}


@mutator("zip", ("zip",))
def zip_huge_declared(data, rng, seed):
    """A member's sizes in the central directory (and its local header) rewritten."""
    buf = bytearray(data)
    eocd = data.rfind(b"PK\x05\x06")
    count, _, cd = struct.unpack_from("<HII", data, eocd + 10)
    entries, pos = [], cd
    for _ in range(count):
        entries.append(pos)
        n, x, c = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + n + x + c
    pos = rng.choice(entries)
    local = struct.unpack_from("<I", data, pos + 42)[0]
    field = rng.choice(["uncompressed", "uncompressed", "compressed"])
    value = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 3 << 30, 0xFFFFFFFF])
    offset = 24 if field == "uncompressed" else 20
    struct.pack_into("<I", buf, pos + offset, value)
    if rng.random() < 0.5:
        struct.pack_into("<I", buf, local + offset - 2, value)
    return bytes(buf), {"field": field, "value": value, "entry": entries.index(pos)}


@mutator("zip", ("zip",))
def zip_nested_dirs(data, rng, seed):
    depth = rng.choice([2, 10, 50, 200])
    prefix = "/".join(f"d{k}" for k in range(depth)) + "/"
    members = [(prefix + Path(name).name, body) for name, body in _zip_members(data) if not name.endswith("/")]
    dirs = ["/".join(f"d{k}" for k in range(i + 1)) + "/" for i in range(depth)] if rng.random() < 0.5 else []
    return _zip_bytes([(d, b"") for d in dirs] + members), {"depth": depth, "dir_entries": bool(dirs)}


@mutator("zip", ("zip",))
def zip_bad_names(data, rng, seed):
    members = [m for m in _zip_members(data) if not m[0].endswith("/")]
    forms = ["../{}", "../../../tmp/{}", "/{}", "C:\\{}", "a/../../{}", "./{}", "..\\{}", "{}\x00.txt", "{}/",
             "a//b///{}", " {}", "{}" + "x" * 300]
    renamed = {}
    for k in sorted(rng.sample(range(len(members)), rng.randint(1, len(members)))):
        form = rng.choice(forms)
        name = form.format(Path(members[k][0]).name)
        renamed[members[k][0]] = name
        members[k] = (name, members[k][1])
    return _zip_bytes(members), {"renamed": renamed}


@mutator("zip", ("zip",))
def zip_duplicates(data, rng, seed):
    members = [m for m in _zip_members(data) if not m[0].endswith("/")]
    k = rng.randrange(len(members))
    same_name = rng.random() < 0.5
    copy = (members[k][0] if same_name else members[k][0] + "_copy", members[k][1])
    members.insert(rng.randint(0, len(members)), copy)
    return _zip_bytes(members), {"member": members[k][0], "same_name": same_name}


@mutator("zip", ("zip",))
def zip_foreign_members(data, rng, seed):
    members = [m for m in _zip_members(data) if not m[0].endswith("/")]
    extras = {"notes.txt": b"not an image\n", "empty.dcm": b"", "DICOMDIR": rng.randbytes(200),
              "__MACOSX/._IM0001": rng.randbytes(64), ".hidden.dcm": members[0][1],
              "inner.zip": data, "image.png": _png_chunk(b"IEND", b""), "huge_name" + "y" * 1000: b"x"}
    chosen = sorted(rng.sample(sorted(extras), rng.randint(1, 4)))
    if rng.random() < 0.3:  # only foreign members: no DICOM left
        members = []
    return _zip_bytes(members + [(n, extras[n]) for n in chosen]), {"added": chosen, "dicom_kept": bool(members)}


# ------------------------------------------------------------------------------------------ recipes

def plan(run_seed: int, index: int, seeds: list[Seed]) -> dict:
    """The recipe of mutant ``index``: which seed and mutator (the mutator's edits come from its own stream)."""
    rng = random.Random(f"plan:{run_seed}:{index}")
    by_kind = {k: [s for s in seeds if s.kind == k] for k in KINDS}
    kinds = [k for k in KINDS if by_kind[k]]
    kind = rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0]
    seed = rng.choice(by_kind[kind])
    family = rng.choices([f for f, _ in FAMILY_WEIGHTS], [w for _, w in FAMILY_WEIGHTS])[0]
    family = kind if family == "format" else family
    options = [m for m in MUTATORS.values() if m.family == family and kind in m.kinds and m.applies(seed)]
    if not options:
        options = [MUTATORS[n] for n in BYTE_MUTATORS]
    m = rng.choice(options)
    return {"run_seed": run_seed, "index": index, "seed": seed.id, "kind": kind, "family": m.family,
            "mutator": m.name}


def make_mutant(recipe: dict, seeds: dict[str, Seed]) -> tuple[bytes, dict, str]:
    """Regenerate a mutant from its recipe: (bytes, details of the edits, file name)."""
    seed = seeds[recipe["seed"]]
    m = MUTATORS[recipe["mutator"]]
    rng = random.Random(f"mutate:{recipe['run_seed']}:{recipe['index']}:{m.name}:{seed.id}")
    try:
        data, details = m.fn(seed.data, rng, seed)
    except Exception as e:  # the seed lacks what the mutator edits: fall back to bit flips, recorded
        data, details = bitflip(seed.data, random.Random(f"fallback:{recipe['run_seed']}:{recipe['index']}"), seed)
        details = {"fallback": f"{type(e).__name__}: {str(e)[:120]}", **details}
    name = f"m{recipe['index']:06d}{'.zip' if seed.kind == 'zip' else seed.suffix}"
    return data, _plain(details), name


# --------------------------------------------------------------------------------- child and server

def _type_name(e: BaseException) -> str:
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short_path(filename: str) -> str:
    p = Path(filename)
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        text = p.as_posix()
        return text.split("site-packages/", 1)[1] if "site-packages/" in text else text


def _locate(e: BaseException, medtl_dir: Path) -> tuple[str, str]:
    """(innermost file:line inside the medtl package, innermost file:line of all) of an exception."""
    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if Path(f.filename).resolve().is_relative_to(medtl_dir)]
    where = lambda f: f"{_short_path(f.filename)}:{f.lineno}" if f else ""  # noqa: E731
    return where(inside[-1] if inside else None), where(frames[-1] if frames else None)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _child_read(path: str, reader, budget: int, medtl_dir: Path, typed_error) -> dict:
    """Runs in the forked child: limits, the read, and its outcome."""
    try:
        from medtl.io.limits import read_limits, set_read_limits

        set_read_limits(read_limits().replace(max_bytes=budget))
    except ImportError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    from medtl.io.bounded import vm_size

    limit = vm_size() + 2 * budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result: dict = {}
    try:
        scan = reader(path)
        array = getattr(scan, "array", None)
        result = {"outcome": "read", "shape": list(getattr(array, "shape", ())),
                  "dtype": str(getattr(array, "dtype", ""))}
    except typed_error as e:
        cause = e.__cause__ or e.__context__
        result = {"outcome": "typed", "error": type(e).__name__, "message": _first_line(e)}
        if cause is not None:
            result["cause"] = _type_name(cause)
    except BaseException as e:  # noqa: BLE001 - an untyped error is what the fuzzer looks for
        location, where = _locate(e, medtl_dir)
        result = {"outcome": "other", "error": _type_name(e), "message": _first_line(e), "location": location,
                  "where": where}
    result["seconds"] = round(time.perf_counter() - t0, 4)
    result["peak_kib"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if children:
        result["children_peak_kib"] = children
    return result


def _fork_read(path: str, timeout: float, reader, budget: int, medtl_dir: Path, typed_error, state: dict) -> dict:
    """Read ``path`` in a forked child with a wall-clock limit; classify how it ended."""
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(r)
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            out = (json.dumps(_child_read(path, reader, budget, medtl_dir, typed_error)) + "\n").encode()
            while out:
                out = out[os.write(w, out):]
        finally:
            os._exit(0)
    state["child"] = pid
    os.close(w)
    buf, timed_out = b"", False
    while not buf.endswith(b"\n"):
        left = t0 + timeout - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if select.select([r], [], [], left)[0]:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            buf += chunk
    os.close(r)
    if timed_out:
        _kill_group(pid)
    status = _reap(pid, 5.0)
    _kill_group(pid)  # anything the reader started
    state["child"] = None
    seconds = round(time.monotonic() - t0, 4)
    if timed_out:
        return {"outcome": "timeout", "error": "Timeout", "message": f"no result after {timeout:g} s",
                "seconds": seconds}
    if buf.endswith(b"\n"):
        return json.loads(buf)
    if os.WIFSIGNALED(status):
        how = signal.Signals(os.WTERMSIG(status)).name
    else:
        how = f"exit status {os.WEXITSTATUS(status)}"
    return {"outcome": "killed", "error": how, "message": f"child died ({how}) without a result", "seconds": seconds}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            _kill_group(pid)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.005)


def _resolve(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def serve(config: dict) -> None:
    """The server loop (its own process): import the readers once, then fork a child per job."""
    import gc

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever readers print goes nowhere; results use the saved descriptor
    budget = int(config["budget"])
    os.environ["MEDTL_MAX_INPUT_BYTES"] = str(budget)
    import medtl
    from medtl.errors import MedtlInputError

    reader = _resolve(config["reader"])
    medtl_dir = Path(medtl.__file__).resolve().parent
    for path in config.get("warm", []):  # lazy imports (decoders, Pillow plugins) happen here, once
        try:
            reader(path)
        except BaseException:  # noqa: BLE001
            pass
    gc.collect()
    state: dict = {"child": None}

    def stop(signum, frame):
        if state["child"]:
            _kill_group(state["child"])
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    proto.write("ready\n")
    for line in sys.stdin:
        job = json.loads(line)
        result = _fork_read(job["path"], float(job["timeout"]), reader, budget, medtl_dir, MedtlInputError, state)
        proto.write(json.dumps(result) + "\n")


class Server:
    """One warm server process; :meth:`read` returns a child's outcome for one file."""

    def __init__(self, reader: str, budget: int, warm: list[str] = (), log: Path | None = None,
                 scratch: Path | None = None):
        self.config = {"reader": reader, "budget": budget, "warm": list(warm)}
        self.log = log
        self.scratch = scratch  # TMPDIR of the server and its children (a killed child leaves its files there)
        self.proc = None
        self.buf = b""

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and Path(p).exists()),
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MEDTL_MAX_INPUT_BYTES=str(self.config["budget"]))
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.scratch)
        err = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, str(HARNESS), "--serve", json.dumps(self.config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                     start_new_session=True)
        if self.log:
            err.close()
        self.buf = b""
        line = self._readline(300)
        if line != "ready":
            self.stop()
            raise RuntimeError(f"fuzz server did not start (got {line!r}); run with --log to see why")

    def _readline(self, seconds: float) -> str | None:
        deadline = time.monotonic() + seconds
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def read(self, path: str | Path, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        t0 = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps({"path": str(path), "timeout": timeout}) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(timeout + 30)
        except (BrokenPipeError, OSError):
            line = None
        if line is None:  # the server itself died or hung: start a new one for the next file
            self.stop()
            return {"outcome": "killed", "error": "server lost", "message": "the fuzz server died or stopped answering",
                    "seconds": round(time.monotonic() - t0, 4)}
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except Exception:  # noqa: BLE001
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------- run

def parse_budget(text: str | int) -> int:
    if isinstance(text, int):
        return text
    from medtl.io.limits import parse_bytes

    return parse_bytes(text, "--budget")


def run(n: int = 1000, seed: int = 0, jobs: int = 2, budget: str | int = "2G", timeout: float = 10.0,
        seeds: str = "generated", data: Path | None = None, out: Path | None = None, keep_failures: bool = False,
        reader: str = DEFAULT_READER, recipes: list[dict] | None = None, progress=print,
        log: Path | None = None) -> dict:
    """Make and read ``n`` mutants (or the given ``recipes``); return the report (see :func:`summarize`)."""
    budget_bytes = parse_budget(budget)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="medtl-fuzz-"))
    servers: list[Server] = []
    try:
        seed_list = load_seeds(seeds, data)
        by_id = {s.id: s for s in seed_list}
        if recipes is None:
            recipes = [plan(seed, i, seed_list) for i in range(n)]
        missing = sorted({r["seed"] for r in recipes} - set(by_id))
        if missing:
            raise SystemExit(f"recipes name seeds that this run does not have: {', '.join(missing[:5])} "
                             "(give the same --seeds and --data as the run that recorded them)")
        (work / "warm").mkdir()
        warm = []
        if reader == DEFAULT_READER:
            for s in [x for x in seed_list if x.id.startswith("gen:")] + sorted(
                    (x for x in seed_list if x.id.startswith("data:") and len(x.data) < 1 << 20),
                    key=lambda x: x.id)[:12]:
                p = work / "warm" / f"w{len(warm):03d}{s.suffix}"
                p.write_bytes(s.data)
                warm.append(str(p))
        (work / "mutants").mkdir()
        if keep_failures and out is not None:
            (Path(out) / "failures").mkdir(parents=True, exist_ok=True)
        results: list[dict] = []
        lock = threading.Lock()
        todo = iter(recipes)
        step = max(1, len(recipes) // 10)

        def worker(server: Server) -> None:
            while True:
                with lock:
                    recipe = next(todo, None)
                if recipe is None:
                    return
                data_bytes, details, name = make_mutant(recipe, by_id)
                path = work / "mutants" / name
                path.write_bytes(data_bytes)
                res = server.read(path, timeout)
                row = {**{k: recipe[k] for k in ("run_seed", "index", "seed", "kind", "family", "mutator")},
                       "details": details, "size": len(data_bytes), **res}
                row["over_budget"] = row.get("peak_kib", 0) * 1024 > budget_bytes
                if keep_failures and out is not None and (row["outcome"] in BAD or row["over_budget"]):
                    shutil.copy(path, Path(out) / "failures" / name)
                path.unlink(missing_ok=True)
                with lock:
                    results.append(row)
                    done = len(results)
                    if progress and (done % step == 0 or done == len(recipes)):
                        c = Counter(x["outcome"] for x in results)
                        progress(f"  {done}/{len(recipes)} mutants: " + ", ".join(f"{c[o]} {o}" for o in OUTCOMES)
                                 + f" [{time.monotonic() - t_start:.0f} s]", flush=True)

        errors: list[BaseException] = []

        def thread(server: Server) -> None:
            try:
                server.start()
                worker(server)
            except BaseException as e:  # a harness bug: stop the others and raise it below
                errors.append(e)
                with lock:
                    for _ in todo:
                        pass

        for _ in range(max(1, jobs)):
            servers.append(Server(reader, budget_bytes, warm, log, scratch=work / "tmp"))
        threads = [threading.Thread(target=thread, args=(s,), daemon=True) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    results.sort(key=lambda r: r["index"])
    report = summarize(results, budget_bytes, time.monotonic() - t_start,
                       {"n": len(recipes), "seed": seed, "jobs": jobs, "timeout": timeout, "seeds": seeds,
                        "data": str(data) if data else None, "reader": reader,
                        "seed_files": dict(Counter(s.kind for s in seed_list))})
    if out is not None:
        write_outputs(report, Path(out))
    return report


def summarize(results: list[dict], budget: int, seconds: float, meta: dict) -> dict:
    """Counts per seed kind and mutator family, failure signatures and the peak memory."""
    def row(label, rs, secs=None):
        c = Counter(r["outcome"] for r in rs)
        return {"rows": label, "mutants": len(rs), **{o: c[o] for o in OUTCOMES},
                "peak_mib": round(max((r.get("peak_kib", 0) for r in rs), default=0) / 1024, 1),
                "seconds": round(sum(r.get("seconds", 0) for r in rs) if secs is None else secs, 1)}

    table = [row(f"kind {k}", [r for r in results if r["kind"] == k]) for k in KINDS
             if any(r["kind"] == k for r in results)]
    table += [row(f"family {f}", [r for r in results if r["family"] == f]) for f in FAMILIES
              if any(r["family"] == f for r in results)]
    table.append(row("total", results, seconds))
    failures = [r for r in results if r["outcome"] in BAD or r.get("over_budget")]
    groups: dict[tuple, list[dict]] = {}
    for r in failures:
        if r["outcome"] in BAD:
            key = (r["outcome"], r.get("error", ""), r.get("location", ""))
        else:  # read or refused, but over the budget on the way
            key = ("over budget", f"{r['outcome']} {r.get('error', '')}".strip(), r["mutator"])
        groups.setdefault(key, []).append(r)

    def message(r):
        if r["outcome"] in BAD:
            return r.get("message", "")
        return f"peak {r['peak_kib'] / 1024:.0f} MiB, budget {budget / 2 ** 20:.0f} MiB"

    signatures = [{"outcome": k[0], "error": k[1], "location": k[2], "count": len(v),
                   "where": v[0].get("where", ""), "message": message(max(v, key=lambda r: r.get("peak_kib", 0))),
                   "mutators": dict(Counter(x["mutator"] for x in v).most_common()),
                   "example": {x: v[0][x] for x in ("run_seed", "index", "seed", "mutator", "details")}}
                  for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    peak = max(results, key=lambda r: r.get("peak_kib", 0), default={})
    typed = Counter(r["error"] + (f" (from {r['cause']})" if r.get("cause") in ("MemoryError", "RecursionError")
                                  else "") for r in results if r["outcome"] == "typed")
    fallbacks = Counter(r["mutator"] for r in results if "fallback" in r.get("details", {}))
    return {**meta, "budget_bytes": budget, "seconds": round(seconds, 1), "table": table,
            "outcomes": {o: table[-1][o] for o in OUTCOMES}, "peak_mib": table[-1]["peak_mib"],
            "peak_index": peak.get("index"), "within_budget": not any(r.get("over_budget") for r in results),
            "typed": dict(typed.most_common()), "fallbacks": dict(fallbacks.most_common()),
            "signatures": signatures, "failures": failures, "results": results,
            "exit_status": 1 if failures else 0}


def format_table(report: dict) -> str:
    cols = ["rows", "mutants", *OUTCOMES, "peak_mib", "seconds"]
    head = ["rows", "mutants", *OUTCOMES, "peak MiB", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in report["table"]:
        cells = [f"**{r[c]}**" if r["rows"] == "total" and c == "rows" else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    budget_mib = report["budget_bytes"] / 2 ** 20
    out = [format_table(report), "",
           "(seconds: time spent reading, summed over the row's mutants; total: wall time)",
           f"peak memory: max {report['peak_mib']:.1f} MiB (mutant {report['peak_index']}), "
           f"budget {budget_mib:.0f} MiB: "
           + ("within budget" if report["within_budget"] else "OVER BUDGET"),
           "typed refusals: " + (", ".join(f"{k} {v}" for k, v in report["typed"].items()) or "none")]
    if report["fallbacks"]:
        out.append("mutators that fell back to bit flips (seed lacked what they edit): "
                   + ", ".join(f"{k} {v}" for k, v in report["fallbacks"].items()))
    if report["signatures"]:
        out += ["", f"failure signatures ({len(report['signatures'])} distinct, {len(report['failures'])} mutants):"]
        for s in report["signatures"]:
            ex = s["example"]
            at = f"mutator {s['location']}" if s["outcome"] == "over budget" else s["location"] or s["where"] or "?"
            out.append(f"  {s['count']:5d}  {s['outcome']}: {s['error']} at {at}  [{s['message'][:100]}]")
            out.append(f"         e.g. mutant {ex['index']} (seed {ex['run_seed']}): {ex['mutator']} on {ex['seed']} "
                       f"{json.dumps(ex['details'])[:160]}")
    else:
        out += ["", "no failures: every mutant was read or refused with a typed error, in budget"]
    return "\n".join(out)


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(f"# Reader fuzzing: {report['n']} mutants, run seed {report['seed']}\n\n"
                                    + format_report(report) + "\n")
    summary = {k: v for k, v in report.items() if k not in ("failures", "results")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "failures.jsonl", "w") as f:
        for r in report["failures"]:
            f.write(json.dumps(r) + "\n")
    with open(out / "results.jsonl", "w") as f:
        for r in report["results"]:
            f.write(json.dumps(r) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serve"]:
        serve(json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="mutants to make and read (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="run seed: mutant i is the same for the same seed (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="mutants read at once (default 2)")
    p.add_argument("--budget", default="2G", help="memory budget per read, e.g. 512M (default 2G)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a read counts as hung (default 10)")
    p.add_argument("--data", type=Path, default=None, help="real data folder (default $MEDTL_SHARED_DATA or "
                   "../shared/data)")
    p.add_argument("--seeds", choices=("generated", "data", "both"), default=None,
                   help="seed files (default both where the data folder exists, else generated)")
    p.add_argument("--out", type=Path, default=Path("results/fuzz"))
    p.add_argument("--keep-failures", action="store_true", help="copy failing mutants to OUT/failures/")
    p.add_argument("--replay", type=Path, help="re-read the mutants recorded in a failures.jsonl")
    p.add_argument("--reader", default=DEFAULT_READER, help=argparse.SUPPRESS)
    p.add_argument("--log", type=Path, help="append the servers' stderr (reader warnings) to this file")
    args = p.parse_args(argv)
    data = args.data or default_data_dir()
    seeds = args.seeds or ("both" if data and data.is_dir() else "generated")
    recipes = None
    if args.replay:
        recipes = [json.loads(line) for line in args.replay.read_text().splitlines() if line.strip()]
    budget = parse_budget(args.budget)
    print(f"fuzzing {len(recipes) if recipes else args.n} mutants (run seed {args.seed}, seeds {seeds}"
          + (f" from {data}" if seeds != "generated" else "") + f", {args.jobs} jobs, budget {args.budget}, "
          f"timeout {args.timeout:g} s)", flush=True)
    report = run(args.n, args.seed, args.jobs, budget, args.timeout, seeds, data if seeds != "generated" else None,
                 args.out, args.keep_failures, args.reader, recipes, log=args.log)
    print()
    print(format_report(report))
    print(f"\nwrote {args.out}/summary.md, summary.json, failures.jsonl, results.jsonl"
          + (f" and failures/ ({len(report['failures'])} files)" if args.keep_failures else ""))
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
