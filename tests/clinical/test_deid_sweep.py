"""The canary sweep of ``medtl deid`` (issue 32, item 4): a canary in every PN, UT, LT, ST and UC attribute of
the DICOM dictionary, at the top level and nested (inside an SR's Content Sequence and two sequences deep),
and in private elements of those VRs, must reach no byte of the output; and an element whose length swallowed
the patient's ID is not kept even when it is a date or a time (which the profile shifts or keeps)."""

import struct

import pydicom
import pytest
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtl.cli import main
from medtl.clinical.deid import Deidentifier, deidentify_files

KEY = b"0123456789abcdef-test-key"
SWEPT_VRS = ("PN", "UT", "LT", "ST", "UC")
CANARY = "CANARYSWEEP"


def _base() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    return ds


def _swept_tags() -> list[tuple[int, str]]:
    """Every attribute of the dictionary whose VR is a person name or free text (not the file meta group)."""
    return [
        (tag, entry[0])
        for tag, entry in sorted(DicomDictionary.items())
        if entry[0] in SWEPT_VRS and tag >> 16 not in (0x0000, 0x0002)
    ]


def _plant(target: Dataset, where: str) -> None:
    for tag, vr in _swept_tags():
        target.add_new(tag, vr, f"{CANARY}{where}{tag:08X}" + ("^Jane" if vr == "PN" else " seen by Dr Jane Doe"))
    block = target.private_block(0x0029, "CANARY CREATOR", create=True)
    for k, vr in enumerate(SWEPT_VRS + ("LO", "SH")):
        block.add_new(0x10 + k, vr, f"{CANARY}{where[0]}P{k}")


def _canaried() -> Dataset:
    ds = _base()
    _plant(ds, "TOP")
    text = Dataset()  # an SR content item, as a report would hold it
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121106", "DCM", "Comment"
    text.ConceptNameCodeSequence = Sequence([code])
    _plant(text, "CONTENT")
    ds.ContentSequence = Sequence([text])
    deep, inner = Dataset(), Dataset()
    _plant(deep, "DEEP")
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
    inner.PurposeOfReferenceCodeSequence = Sequence([deep])
    ds.AnatomicRegionSequence = Sequence([inner])
    return ds


def test_no_person_name_free_text_or_private_canary_survives_deid(tmp_path):
    src = tmp_path / "in" / "canaried.dcm"
    src.parent.mkdir()
    _canaried().save_as(src, enforce_file_format=True)
    planted = src.read_bytes().count(CANARY.encode())
    assert planted >= 3 * (len(_swept_tags()) + 7)  # the sweep can fail: every canary is in the source
    assert main(["deid", str(src.parent), "--out", str(tmp_path / "out"), "--key-file", _key(tmp_path)]) == 0
    (out,) = sorted((tmp_path / "out").rglob("*.dcm"))
    data = out.read_bytes()
    assert CANARY.encode() not in data and b"Jane" not in data, data[data.find(CANARY.encode()) - 40 :][:120]
    ds = pydicom.dcmread(out)
    assert ds.ContentSequence[0].TextValue == "ANONYMIZED"  # a TEXT item keeps its (type 1) value, replaced
    assert ds.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Comment"  # coded content is kept
    assert not any(e.tag.is_private for e in ds.iterall())


def _key(tmp_path) -> str:
    path = tmp_path / "key"
    path.write_bytes(KEY)
    return str(path)


@pytest.mark.parametrize(
    "keyword, vr, value",
    [("StudyTime", "TM", "101010"), ("AcquisitionDateTime", "DT", "20200101101010"), ("StudyDate", "DA", "20200101")],
)
def test_a_date_or_time_that_swallowed_the_patient_id_is_not_kept(tmp_path, keyword, vr, value):
    ds = _base()
    setattr(ds, keyword, value)
    ds.PatientName, ds.PatientID = "SWALLOW^NAME", "SWALLOWEDMRN7"
    ds.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    raw = bytearray((tmp_path / "good.dcm").read_bytes())
    tag = pydicom.datadict.tag_for_keyword(keyword)
    head = raw.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode(), 132)
    end = raw.index(b"SWALLOWEDMRN7") + len(b"SWALLOWEDMRN7")
    raw[head + 6 : head + 8] = struct.pack("<H", end - (head + 8))  # its length now reaches past the ID
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.dcm").write_bytes(raw)
    assert "SWALLOWEDMRN7" in str(pydicom.dcmread(tmp_path / "in" / "x.dcm").get(keyword))  # damaged as meant
    result = deidentify_files([tmp_path / "in" / "x.dcm"], tmp_path / "out", Deidentifier(key=KEY))
    assert len(result.written) == 1 and not result.errors
    out = result.written[0].read_bytes()
    assert b"SWALLOWEDMRN7" not in out and b"SWALLOW^NAME" not in out


def test_what_the_profile_keeps_excludes_names_and_free_text():
    """What a page or a log may show of a header (``profile_keeps``) follows the rule: no person name or free
    text, listed by the table or not."""
    from medtl.clinical.deid import profile_keeps

    assert not profile_keeps("EvaluatorName") and not profile_keeps("TextValue")
    assert not profile_keeps("PatientName") and profile_keeps("Modality") and profile_keeps("Rows")
