"""De-identification of DICOM: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

The profile's action table (which attribute is removed, emptied, replaced or has its UIDs remapped) is
the one KitwareMedical's ``dicom-anonymizer`` keeps transcribed from the standard (edition 2026c).
medtl applies it itself, because that package applies it to the top level of a file only and replaces
dates by a constant: here the actions reach every nested sequence item, and

- **UIDs** (the table's U attributes: study, series, instance, frame of reference, referenced
  instances) are remapped by a keyed hash, ``2.25.<HMAC(key, uid)>``: one UID maps to the same new UID
  in every file, so a study stays a study and references between its instances still resolve;
- **patients** get a pseudonym (``medtl-`` and 12 hex digits of the keyed hash of the patient ID) as
  name and ID, so the patient-level grouping a split needs survives;
- **dates** are shifted, by default, by a number of days (between 1 and 3650 back) drawn from the keyed
  hash of the patient ID: the same for every file of a patient, so intervals survive. This is the
  profile's *Retain Longitudinal Temporal Information with Modified Dates Option* (times of day are
  kept). ``dates="remove"`` applies the basic profile's own actions to dates and times instead;
- **person names and free text**: every PN, UT, LT, ST and UC value, at any depth (an SR's TextValue, an
  EvaluatorName), is replaced by ``ANONYMIZED`` whether the table lists the attribute or not;
- **private attributes** are all removed (no Retain Safe Private Option);
- **damaged elements**: a kept, shifted or time value longer than its VR allows or holding control characters
  (its length swallowed the elements after it, the patient's ID among them) is removed;
- **burned-in annotation**: an image whose ``BurnedInAnnotation`` is ``YES`` is refused
  (:class:`BurnedInAnnotationError`) unless the caller accepts it: the text in its pixels is not
  removed.

The key is the caller's (``MEDTL_DEID_KEY``, or a key file): with the same key, two runs give the same
UIDs and pseudonyms. Without one, a random key is drawn per :class:`Deidentifier`, consistent within
its run and unlinkable afterwards.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from medtl.errors import ConfigError, CorruptImageError, MedtlError, MedtlInputError
from medtl.io.cpu import cpu_limited
from medtl.io.dicom import open_dicom
from medtl.io.guard import reading
from medtl.io.limits import read_limits
from medtl.io.walk import walk_files
from medtl.version import __version__

log = logging.getLogger("medtl.clinical.deid")

KEY_ENV = "MEDTL_DEID_KEY"
TABLE_EDITION = "dicomfields_2026c"
DATE_VRS = ("DA", "DT")
# the table's categories, as the actions medtl applies (a combination names what is allowed; D on a
# date is a shift or a dummy date, X otherwise; U* sequences are kept: their UIDs are remapped and
# their items cleaned like any other dataset)
CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "ZD",
    "X_Z_TAGS": "X",
    "X_D_TAGS": "XD",
    "X_Z_D_TAGS": "XZD",  # (a sequence: emptied, Z, as a Type 2 one must stay; another element: X or D)
    "X_Z_U_STAR_TAGS": "K",
}
DUMMY_TEXT = "ANONYMIZED"
# person names and free text: replaced wherever they are, listed by the table or not (an SR's TextValue, an
# EvaluatorName, a PN in a sequence item), since their values are whatever someone typed
FREE_TEXT_VRS = ("PN", "UT", "LT", "ST", "UC")
MAX_NESTING = 32  # sequence levels cleaned; a deeper file is refused (a structured report nests a dozen)
BIRTH_DATE = 0x00100030  # emptied (the profile's Z) even when other dates are shifted
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)


class BurnedInAnnotationError(MedtlInputError):
    """An image with text burned into its pixels (``BurnedInAnnotation = YES``): de-identifying its header
    leaves the text; refused unless the user accepts such images."""


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    try:
        tables = dicom_anonymization_database_selector(TABLE_EDITION)
    except ValueError:  # an older dicom-anonymizer: its newest edition
        tables = dicom_anonymization_database_selector("dicomfields_2023")
    single, masked = {}, []
    for category, action in CATEGORIES.items():
        for tag in tables[category]:
            if len(tag) == 2:
                single[int(Tag(tag))] = action
            else:
                masked.append((tag[0], tag[1], tag[2], tag[3], action))
    return single, masked


_TABLE: tuple[dict[int, str], list] | None = None


def _action(tag: int) -> str | None:
    global _TABLE
    if _TABLE is None:
        _TABLE = _load_table()
    single, masked = _TABLE
    if tag in single:
        return single[tag]
    group, elem = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, action in masked:  # repeating groups: curves (50xx), overlays (60xx)
        if group & gm == g & gm and elem & em == e & em:
            return action
    return None


def profile_keeps(keyword: str) -> bool:
    """Whether ``medtl deid``'s profile keeps a DICOM attribute's value as it is (no action, or K): what a page or
    a log may show of a header. A name that is no DICOM keyword (a computed field: shape, spacing) is kept."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        return True
    if pydicom.datadict.dictionary_VR(tag) in FREE_TEXT_VRS:  # names and free text: replaced wherever they are
        return False
    return _action(tag) in (None, "K")


def profile_table() -> dict[int, str]:
    """The profile's action of each listed attribute (tag as an int): D, Z, X, U, ZD, XD, XZD or K (the U*
    sequences, kept with their UIDs remapped); repeating groups are not in it."""
    _action(0)
    return dict(_TABLE[0])


def read_key(key_file: str | Path | None = None) -> bytes | None:
    """The de-identification key: the file's content, else ``$MEDTL_DEID_KEY``, else None (a random one)."""
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise ConfigError(key_file, f"cannot read the de-identification key ({e.strerror})") from None
        if len(key) < 16:
            raise ConfigError(key_file, "the de-identification key is shorter than 16 bytes", "a random key file")
        return key
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


@dataclass
class Deidentifier:
    """Applies the profile to datasets; one instance per run keeps UIDs, pseudonyms and date shifts
    consistent across all the files it sees."""

    key: bytes | None = None
    dates: str = "shift"  # or "remove"
    accept_burned_in: bool = False
    _key: bytes = field(init=False, repr=False)

    def __post_init__(self):
        if self.dates not in ("shift", "remove"):
            raise ConfigError(None, f"dates={self.dates!r}", "'shift' or 'remove'")
        self._key = self.key or secrets.token_bytes(32)

    # the keyed mappings ---------------------------------------------------------------------------
    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The new UID of ``uid``: ``2.25.`` and a 128-bit integer (a UUID-derived root, PS3.5 B.2)."""
        return "2.25." + str(int.from_bytes(self._digest("uid", str(uid).strip())[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        return "medtl-" + self._digest("patient", str(patient_id)).hex()[:12]

    def shift_days(self, patient_id: str) -> int:
        return 1 + int.from_bytes(self._digest("days", str(patient_id))[:4], "big") % 3650

    # the profile ----------------------------------------------------------------------------------
    def dataset(self, ds: Dataset, name: str | Path | None = None) -> Dataset:
        """De-identify ``ds`` in place and return it. ``name`` is the file, for errors: they say what was
        wrong, never a value from the file."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not self.accept_burned_in:
            raise BurnedInAnnotationError(
                name,
                "the image has text burned into its pixels (BurnedInAnnotation "
                "YES); its header can be cleaned, the text cannot",
                "an image without burned-in annotation, or accept_burned_in",
            )
        patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
        days = self.shift_days(patient)
        try:
            self._clean(ds, days)
        except CorruptImageError as e:
            raise CorruptImageError(name, e.problem) from None
        ds.PatientID = self.pseudonym(patient)
        ds.PatientName = ds.PatientID + "^"  # a family name only (the caret says so)
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.dates == "shift" else "REMOVED"
        ds.DeidentificationMethod = (
            f"medtl {__version__}: PS3.15 E.1 Basic Profile"
            + (", Retain Longitudinal Temporal Information with Modified Dates Option" if self.dates == "shift" else "")
        )[:64]
        codes = METHOD_CODES if self.dates == "shift" else METHOD_CODES[:1]
        ds.DeidentificationMethodCodeSequence = Sequence([_code(v, m) for v, m in codes])
        meta = getattr(ds, "file_meta", None)
        new_meta = FileMetaDataset()
        new_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", meta.get("MediaStorageSOPClassUID") if meta else "")
        new_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
        new_meta.TransferSyntaxUID = (
            meta.get("TransferSyntaxUID") if meta else None
        ) or pydicom.uid.ExplicitVRLittleEndian
        new_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        new_meta.ImplementationVersionName = "MEDTL_DEID"
        ds.file_meta = new_meta  # the source's (AE titles, private meta elements) is not kept
        return ds

    def _clean(self, ds: Dataset, days: int, depth: int = 0) -> None:
        if depth > MAX_NESTING:  # (pydicom formats the traceback at every level of a deeper one: minutes)
            raise CorruptImageError(None, f"sequences nested more than {MAX_NESTING} deep")
        # private elements and their creators, of this level only: remove_private_tags() walks every sequence at
        # once, unbounded; the items below are cleaned in turn, to a bounded depth
        for tag in [t for t in ds.keys() if t.is_private]:  # noqa: SIM118 -- iterating a Dataset gives elements
            del ds[tag]
        for elem in list(ds):
            if elem.VR == "SQ":
                self._clean_sequence(ds, elem, days, depth)
            else:
                self._clean_element(ds, elem, days)

    def _clean_sequence(self, ds: Dataset, elem, days: int, depth: int) -> None:
        action = _action(int(elem.tag))
        if action in ("X", "XD"):
            del ds[elem.tag]
        elif action in ("Z", "XZD"):  # X/Z/D: emptied, not removed (an SR's Referenced Performed Procedure Step
            elem.value = Sequence()  # Sequence is Type 2), which leaves nothing of it
        else:  # D (Content Sequence), U*, or not listed: clean each item
            for item in elem.value:
                self._clean(item, days, depth + 1)

    def _clean_element(self, ds: Dataset, elem, days: int) -> None:
        tag, vr = int(elem.tag), elem.VR
        action = _action(tag)
        shifted = vr in DATE_VRS + ("TM",) and self.dates == "shift" and action not in ("X", "U") and tag != BIRTH_DATE
        if (shifted or action in (None, "K")) and _swallowed(elem):
            # kept (or shifted) by the table, but its value holds what follows it in the file
            log.warning("removed %s: its value is too long or holds encoded elements", elem.tag)
            del ds[elem.tag]
        elif shifted:
            if vr != "TM":  # dates moved back; times of day kept (the Modified Dates Option)
                elem.value = self._shift(elem, days)
        elif action is None or action == "K":
            if vr in FREE_TEXT_VRS and elem.value not in (None, ""):  # a name or free text the table does not list
                elem.value = DUMMY_TEXT
        elif action == "U":
            elem.value = self._uids(elem.value)
        elif action in ("X", "XD", "XZD"):
            del ds[elem.tag]
        elif action == "Z" or (action == "ZD" and vr != "UI"):
            elem.value = None
        elif vr in DATE_VRS + ("TM",):  # D with dates removed: a dummy
            elem.value = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}[vr]
        else:  # D (and Z/D of a UID)
            elem.value = self._dummy(elem) if vr != "UI" else self._uids(elem.value)

    def _uids(self, value):
        if isinstance(value, (list, pydicom.multival.MultiValue)):
            return [self.uid(v) for v in value]
        return self.uid(value) if value else value

    def _shift(self, elem, days: int):
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        out = [_shift_one(str(v), elem.VR, days) for v in values if v not in (None, "")]
        if not out:
            return elem.value
        return out if len(out) > 1 else out[0]

    @staticmethod
    def _dummy(elem):
        vr = elem.VR
        if vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"):
            return DUMMY_TEXT if vr != "CS" else "ANONYMIZED"[:16]
        if vr == "UR":
            return "urn:medtl:anonymized"
        if vr == "AS":
            return "000Y"
        if vr in ("DS", "IS"):
            return "0"
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            return b"\x00\x00"
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"):
            return 0
        return None


# the most characters one value of a VR may have (PS3.5 6.2); PN: three component groups of 64
MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 18, "DS": 16, "DT": 54, "IS": 12, "LO": 64, "PN": 194, "SH": 16,
             "ST": 1024, "LT": 10240, "TM": 28, "UI": 64}  # fmt: skip
# a patient module element's tag as it is encoded (little and big endian): found inside another element's
# value, that element's length swallowed it
_PATIENT_ELEMENTS = (0x0010, 0x0020, 0x0030, 0x1000, 0x1001, 0x1040)  # name, ID, birth date, other IDs/names, address
_PATIENT_TAGS = tuple(
    (0x0010).to_bytes(2, order) + e.to_bytes(2, order) for e in _PATIENT_ELEMENTS for order in ("little", "big")
)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")  # not in any text VR (TAB, LF, FF, CR, ESC are)


def _swallowed(elem) -> bool:
    """Whether a kept element's value is damaged in a way that can carry other elements' values: text longer
    than its VR allows or holding control characters (a wrong length took in the encoded elements after it,
    whose tags and lengths are such bytes), or binary data holding the encoded tag of the patient's name, ID,
    birth date, other IDs or address."""
    if elem.tag == 0x7FE00010 or elem.value is None:
        return False
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        return any(t in value for t in _PATIENT_TAGS)
    values = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
    texts = [str(v) for v in values if isinstance(v, (str, pydicom.valuerep.PersonName))]
    limit = MAX_CHARS.get(elem.VR)
    return any(_CONTROL.search(t) or (limit is not None and len(t) > limit) for t in texts)


def _code(value: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "DCM", meaning
    return c


_DT_REST = re.compile(r"[0-9]{0,6}(\.[0-9]{0,6})?([+-][0-9]{4})?")  # a DT's time of day and offset


def _shift_one(value: str, vr: str, days: int) -> str:
    """A DA (YYYYMMDD) or DT (YYYYMMDD...) value moved ``days`` back; a value that is not a date (a
    damaged or partial one) becomes a dummy date rather than being kept."""
    date = value.strip()[:8]
    try:
        shifted = (dt.datetime.strptime(date, "%Y%m%d") - dt.timedelta(days=days)).strftime("%Y%m%d")
    except ValueError:
        return "19000101"
    rest = value.strip()[8:] if vr == "DT" else ""
    return shifted + (rest if _DT_REST.fullmatch(rest) else "")


@dataclass
class DeidResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already there (same key: same output name)
    errors: list[MedtlError] = field(default_factory=list)  # unreadable or refused: reported, the rest done


def _short(uid) -> str:
    """A file or folder name from a (new) UID."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]


def deidentify_files(
    files: Iterable[str | Path], out: str | Path, deidentifier: Deidentifier | None = None
) -> DeidResult:
    """De-identify DICOM files into ``out``, as ``out/<study>/<series>/<instance>.dcm`` (names from the new
    UIDs, never the source's names, which may hold a patient's). A file that cannot be read, is not
    DICOM, or is refused is reported in the result and skipped; an output that exists is never
    overwritten (with the same key it is the same file)."""
    deid = deidentifier or Deidentifier()
    out, result = Path(out), DeidResult()
    for f in map(Path, files):
        try:
            with cpu_limited(f, read_limits().cpu_s):  # processor time per file, as read_image has
                target, written = _deidentify_file(f, out, deid)
        except MedtlError as e:  # unreadable, damaged or refused: reported and skipped, the rest goes on
            log.warning("skipped: %s", e)
            result.errors.append(e)
            continue
        (result.written if written else result.skipped).append(target)
    return result


def _deidentify_file(f: Path, out: Path, deid: Deidentifier) -> tuple[Path, bool]:
    """De-identify one file into ``out``: (its output, whether it was written now). Any failure, in reading,
    cleaning or writing, is a typed error naming the file, and leaves no partial output."""
    ds = open_dicom(f, f, defer_pixels=True)  # deflated streams inflated within the budget; pixels read on save
    with reading(f, "DICOM file"):
        if "SOPInstanceUID" not in ds:
            raise MedtlInputError(f, "no SOPInstanceUID: not a DICOM instance")
        deid.dataset(ds, name=f)
        target = (
            out
            / f"study-{_short(ds.get('StudyInstanceUID', ''))}"
            / f"series-{_short(ds.get('SeriesInstanceUID', ''))}"
            / f"{_short(ds.SOPInstanceUID)}.dcm"
        )
        if target.exists():
            return target, False
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        try:
            ds.save_as(partial, enforce_file_format=True)
            partial.replace(target)  # whole files only: an interrupted run leaves no half-written output
        finally:
            partial.unlink(missing_ok=True)
    return target, True


def dicom_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files under ``paths`` (files as given; folders searched recursively), sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(walk_files(p)) if p.is_dir() else [p]
    return files


__all__ = [
    "Deidentifier",
    "BurnedInAnnotationError",
    "deidentify_files",
    "dicom_files",
    "read_key",
    "profile_table",
    "KEY_ENV",
]
