"""De-identification (PS3.15 Annex E basic profile) and the canary test: values planted in every VR kind
the profile acts on, in nested sequences and in private tags, must reach no output of medtl's: the
de-identified files, the DICOM results written outside the PACS, the logs and errors of every
command, the web page and its report."""

import logging
import shutil
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medtl.cli import main
from medtl.clinical.deid import BurnedInAnnotationError, Deidentifier, profile_table

TEXT_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")
KEY = b"0123456789abcdef-test-key"


def _table_tags_by_vr() -> dict[str, list[int]]:
    """The profile's listed attributes (those it does not keep), by VR."""
    out: dict[str, list[int]] = {}
    for tag, action in sorted(profile_table().items()):
        if action == "K" or tag >> 16 in (0x0000, 0x0002):
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr in ("SQ", "OB or OW", "US or SS", "US or SS or OW") or tag in (0x00100010, 0x00100020):
            continue
        out.setdefault(vr, []).append(tag)
    return out


class Canaries:
    """Planted values: text ones are searched for in every output's bytes; all are searched for in the
    parsed outputs."""

    def __init__(self):
        self.text: list[str] = []
        self.binary: list[bytes] = []
        self.times: list[str] = []  # TM: kept by the Modified Dates Option, gone with dates="remove"
        self.n = 0

    def value(self, vr: str):
        self.n += 1
        n = self.n
        if vr in TEXT_VRS:
            self.text.append(f"CANARY{n:03d}")
            return f"CANARY{n:03d}" + ("^X" if vr == "PN" else "")
        if vr == "TM":
            self.times.append(f"10{n % 60:02d}{n % 60:02d}.314159")
            return self.times[-1]
        # a value valid for the VR, and the text that gives it away
        searched = {
            "UR": (f"http://canary{n:03d}.invalid", f"canary{n:03d}"),
            "DA": (f"1931{1 + n % 12:02d}{1 + n % 28:02d}",) * 2,
            "DT": (f"1932{1 + n % 12:02d}{1 + n % 28:02d}101112",) * 2,
            "UI": (f"1.2.826.0.1.3680043.10.999.{n}.31415926",) * 2,
            "AS": (f"{n % 100:03d}W",) * 2,
            "DS": (f"{n}.31415",) * 2,
            "IS": (str(314159000 + n),) * 2,
        }
        if vr in searched:
            value, text = searched[vr]
            self.text.append(text)
            return value
        # binary: searched for as bytes (two-byte ones only in the parsed outputs)
        packed = {
            "FD": (31415.0 + n / 1024, "<d"),
            "FL": (31415.0 + n / 1024, "<f"),
            "UL": (0x3141_0000 + n, "<I"),
            "SL": (0x3141_0000 + n, "<i"),
            "US": (31000 + n, None),
            "SS": (31000 + n, None),
        }
        if vr in packed:
            value, fmt = packed[vr]
            if fmt:
                self.binary.append(struct.pack(fmt, value))
            return value
        if vr in ("OB", "OW", "UN"):
            self.binary.append(f"CANARYBIN{n:03d}".encode())
            return self.binary[-1]
        return None

    def plant(self, ds: Dataset) -> None:
        """One listed attribute of every VR kind at the top level and again two sequences deep, the
        patient's name and ID, and private elements (top level and nested)."""
        ds.PatientName, ds.PatientID = "CANARYDOE^JANE", "CANARYMRN42"
        self.text += ["CANARYDOE", "CANARYMRN42"]
        ds.BurnedInAnnotation = "NO"
        tags = _table_tags_by_vr()
        inner = Dataset()
        deep = Dataset()
        for vr, listed in tags.items():
            for target, tag in ((ds, listed[0]), (deep, listed[-1])):
                value = self.value(vr)
                if value is not None:
                    target.add_new(tag, vr, value)
        deep.PatientName = "CANARYDEEP^NAME"
        self.text.append("CANARYDEEP")
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
        inner.PurposeOfReferenceCodeSequence = Sequence([deep])  # not listed: kept, its item cleaned
        ds.AnatomicRegionSequence = Sequence([inner])
        for target in (ds, deep):
            block = target.private_block(0x0029, "CANARY CREATOR", create=True)
            block.add_new(0x10, "LO", self.value("LO"))
            block.add_new(0x11, "UN", self.value("UN"))
            block.add_new(0x12, "FD", self.value("FD"))
            block.add_new(0x13, "OB", self.value("OB"))

    def found_in_bytes(self, data: bytes, times: bool = False) -> list[str]:
        needles = [t.encode() for t in self.text] + self.binary + ([t.encode() for t in self.times] if times else [])
        return [repr(n) for n in needles if n in data]

    def found_in_text(self, text: str) -> list[str]:
        return [t for t in self.text + self.times if t in text]

    def found_in_dataset(self, ds: Dataset) -> list[str]:
        found = []

        def visit(d, elem):
            if elem.VR == "SQ":
                return
            values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
            for v in values:
                if isinstance(v, bytes):
                    found.extend(repr(b) for b in self.binary if b in v)
                elif v is not None:
                    s = str(v)
                    found.extend(t for t in self.text if t in s)
                    if elem.VR in ("US", "SS") and isinstance(v, int) and 31000 < v < 31000 + self.n + 1:
                        found.append(f"{elem.tag} {v}")

        ds.walk(visit)
        return found


def _sources(sample_dir, request) -> list[Path]:
    files = [sorted((sample_dir / "dicom").glob("*.dcm"))[0]]
    shared = Path(request.config.rootpath).parent / "shared" / "data"
    import os

    shared = Path(os.environ.get("MEDTL_SHARED_DATA", shared))
    if (shared / "dicom" / "ct").is_dir():  # real files: a CT and an MR series' first file
        files += sorted(p for p in (shared / "dicom" / "ct").rglob("*") if p.is_file())[:1]
        files += sorted(p for p in (shared / "dicom" / "series").rglob("*") if p.is_file())[:1]
    return files


@pytest.fixture
def canaried(sample_dir, tmp_path, request):
    canaries = Canaries()
    out = []
    for i, src in enumerate(_sources(sample_dir, request)):
        ds = pydicom.dcmread(src)
        canaries.plant(ds)
        target = tmp_path / "in" / f"in_{i}.dcm"
        target.parent.mkdir(exist_ok=True)
        ds.save_as(target)
        out.append(target)
    return canaries, out


def test_the_profile_is_applied_to_nested_items_and_keeps_studies_together(canaried, tmp_path):
    canaries, files = canaried
    assert all(canaries.found_in_dataset(pydicom.dcmread(f)) for f in files)  # the test can fail
    deid = Deidentifier(key=KEY)
    for f in files:
        src = pydicom.dcmread(f)
        ds = deid.dataset(pydicom.dcmread(f))
        assert canaries.found_in_dataset(ds) == []
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("medtl-")
        assert ds.StudyInstanceUID == deid.uid(src.StudyInstanceUID) != src.StudyInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == deid.uid(src.SOPInstanceUID)
        assert ds.SOPClassUID == src.SOPClassUID  # what the instance is stays
        assert not any(e.tag.is_private for e in ds.iterall())
        nested = ds.AnatomicRegionSequence[0].PurposeOfReferenceCodeSequence[0]
        assert not nested.PatientName and ds.AnatomicRegionSequence[0].CodeValue == "T-D0050"
    # the same key: the same UIDs and pseudonym in another run; another key: unlinkable
    a, b = (Deidentifier(key=KEY).dataset(pydicom.dcmread(files[0])) for _ in range(2))
    c = Deidentifier(key=b"another-key-of-16-bytes").dataset(pydicom.dcmread(files[0]))
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID and a.PatientID == b.PatientID != c.PatientID


def test_dates_shift_by_one_interval_per_patient_or_are_removed(canaried):
    _, files = canaried
    src = pydicom.dcmread(files[0])
    src.StudyDate, src.ContentDate, src.PatientBirthDate = "20240310", "20240312", "19700101"
    shifted = Deidentifier(key=KEY).dataset(src.copy())
    import datetime as dt

    day = lambda s: dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))  # noqa: E731
    assert day(shifted.ContentDate) - day(shifted.StudyDate) == dt.timedelta(days=2)  # the interval survives
    assert shifted.StudyDate != "20240310" and not shifted.PatientBirthDate
    assert shifted.LongitudinalTemporalInformationModified == "MODIFIED"
    removed = Deidentifier(key=KEY, dates="remove").dataset(src.copy())
    assert not removed.StudyDate and removed.get("ContentDate") in (None, "", "19000101")


def test_burned_in_annotation_is_refused_unless_accepted(canaried, tmp_path):
    _, files = canaried
    ds = pydicom.dcmread(files[0])
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError, match="burned into its pixels"):
        Deidentifier().dataset(ds.copy(), name="x.dcm")
    assert Deidentifier(accept_burned_in=True).dataset(ds).PatientIdentityRemoved == "YES"


def test_no_canary_reaches_any_output(canaried, tiny_run, tmp_path, capsys, caplog, monkeypatch):
    """Files (medtl deid, medtl dicom-results), logs and errors (every command, verbose), the web page and
    its PDF report."""
    canaries, files = canaried
    caplog.set_level(logging.DEBUG)
    bad = tmp_path / "in" / "in_broken.dcm"  # an error path: a damaged canaried file
    bad.write_bytes(files[0].read_bytes()[:2000])
    burned = pydicom.dcmread(files[0])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(tmp_path / "in" / "in_burned.dcm")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    inputs = tmp_path / "in"
    assert main(["-v", "deid", str(inputs), "--out", str(tmp_path / "deid"), "--key-file", str(key_file)]) == 1
    assert main(["-v", "deid", str(inputs), "--out", str(tmp_path / "deid"), "--key-file", str(key_file)]) == 1
    written = sorted((tmp_path / "deid").rglob("*.dcm"))
    assert len(written) == len(files)  # the broken and the burned-in file reported, the rest done, once
    main(["-v", "dicom-results", str(tiny_run), *map(str, files), str(bad), "--out", str(tmp_path / "results")])
    results = sorted((tmp_path / "results").rglob("*.dcm"))
    assert len(results) >= len(files)
    main(["-v", "predict", str(tiny_run), *map(str, files), str(bad)])
    main(["-v", "info", str(files[0])])
    outputs = written + results
    leaks = {str(f.relative_to(tmp_path)): canaries.found_in_bytes(f.read_bytes()) for f in outputs}
    leaks.update(
        {f"{f.relative_to(tmp_path)} (parsed)": canaries.found_in_dataset(pydicom.dcmread(f)) for f in outputs}
    )
    assert not any(leaks.values()), leaks
    # results de-identified: pseudonymised patient, no source UID
    assert all(pydicom.dcmread(f).PatientID.startswith("medtl-") for f in results)

    import matplotlib

    from medtl.predict.predictor import load_run
    from medtl_ui.app import export_report, header_summary, run_case

    monkeypatch.setitem(matplotlib.rcParams, "pdf.compression", 0)  # the report's text searchable
    predictor = load_run(tiny_run)
    page = []
    for i, f in enumerate(files):
        upload = tmp_path / f"upload{i}" / f.name
        upload.parent.mkdir()
        shutil.copy(f, upload)
        image, probs, overlay, message, case = run_case(predictor, [str(upload)], workdir=tmp_path / f"w{i}")
        page.append(message)
        if case is not None:
            page.append(str(header_summary(case.scan)))
            page.append(str(case.files))
            for report in export_report(predictor, case, tmp_path / f"w{i}"):
                assert not canaries.found_in_bytes(Path(report).read_bytes()), report
    captured = capsys.readouterr()
    said = "\n".join([captured.out, captured.err, caplog.text, *page])
    assert "CANARY" not in said and not canaries.found_in_text(said), canaries.found_in_text(said)
