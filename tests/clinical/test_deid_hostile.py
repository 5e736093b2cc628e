"""``medtl deid`` on damaged and hostile files (issue 33): every damage the fuzz found is a typed error naming
the file, the file is skipped and the rest of the folder goes on, nothing partial is left; an element whose
length swallowed the patient's name and ID is not kept; a folder too deep is a typed error, not a
RecursionError. The damaged files are made here from a generated DICOM file."""

import io
import os
from pathlib import Path

import pydicom
import pytest

from medtl.cli import main
from medtl.clinical.deid import Deidentifier, deidentify_files, dicom_files
from medtl.errors import InputTooLargeError, MedtlInputError

KEY = b"0123456789abcdef-test-key"
NAME, PID = b"DOE^JOHN", b"PID12345"


def _good(sample_dir) -> pydicom.Dataset:
    ds = pydicom.dcmread(sample_dir / "dicom" / "img_0001.dcm")
    ds.PatientName, ds.PatientID, ds.Manufacturer = NAME.decode(), PID.decode(), "ACME"
    return ds


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _swallowing(sample_dir) -> bytes:
    """A file whose Manufacturer (0008,0070; kept by the profile) has a length reaching past the patient's ID:
    parsed, Manufacturer holds the encoded name and ID, and the file has no PatientName or PatientID."""
    data = _bytes(_good(sample_dir))
    head = data.index(b"\x08\x00\x70\x00LO")
    end = data.index(PID) + len(PID)
    length = end - (head + 8)
    assert length % 2 == 0 and length < 65536
    return data[: head + 6] + length.to_bytes(2, "little") + data[head + 8 :]


def test_an_element_that_swallowed_the_patient_is_not_kept(sample_dir, tmp_path):
    src = tmp_path / "in" / "x.dcm"
    src.parent.mkdir()
    src.write_bytes(_swallowing(sample_dir))
    parsed = pydicom.dcmread(src)
    assert "PatientID" not in parsed and PID.decode() in str(parsed.Manufacturer)  # the damage is as intended
    result = deidentify_files([src], tmp_path / "out", Deidentifier(key=KEY))
    assert len(result.written) == 1 and not result.errors
    out = result.written[0].read_bytes()
    assert PID not in out and NAME not in out  # today's code kept Manufacturer and the ID inside it
    assert "Manufacturer" not in pydicom.dcmread(result.written[0])


def _damaged(sample_dir, tmp_path) -> dict[str, Path]:
    good = _good(sample_dir)
    files = {}

    def write(name, data):
        files[name] = tmp_path / "in" / f"{name}.dcm"
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_bytes(data)

    write("good", _bytes(good))
    data = _bytes(good)
    at = data.index(b"\x08\x00\x70\x00LO")
    write("unknown_vr", data[: at + 4] + b"ZZ" + data[at + 6 :])
    ds = _good(sample_dir)
    ds.SpecificCharacterSet = "ISO_IR 999"
    write("bogus_charset", _bytes(ds))
    ds = _good(sample_dir)
    del ds.SOPClassUID
    del ds.file_meta.MediaStorageSOPClassUID
    write("no_sop_class", _bytes_unchecked(ds))
    at = data.index(b"\x08\x00\x08\x00CS")  # the first element after the file meta
    extra = b"\x00\x00\x00\x01US\x02\x00\x01\x00"  # a command-set element (0000,0100) in a file
    extra += b"\x02\x00\x13\x00SH\x02\x00X "  # and (0002,0013) outside the file meta
    write("command_set", data[:at] + extra + data[at:])
    write("truncated", _bytes(good)[:600])
    write("not_dicom", b"hello, this is a text note")
    return files


def _bytes_unchecked(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.filewriter.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def test_a_damaged_file_is_reported_and_skipped_and_the_folder_goes_on(sample_dir, tmp_path, capsys):
    files = _damaged(sample_dir, tmp_path)
    result = deidentify_files(sorted(files.values()), tmp_path / "out", Deidentifier(key=KEY))
    assert len(result.written) >= 1  # the good file at least
    assert all(isinstance(e, MedtlInputError) for e in result.errors)
    named = {Path(e.path).stem for e in result.errors}
    assert "not_dicom" in named and "good" not in named
    assert len(result.written) + len(result.skipped) + len(result.errors) == len(files)  # each written or reported
    assert not list((tmp_path / "out").rglob("*.part"))  # nothing partial
    for f in result.written:
        data = f.read_bytes()
        assert PID not in data and NAME not in data
    # the CLI: one line per bad file, exit status 1, no traceback
    code = main(["deid", str(tmp_path / "in"), "--out", str(tmp_path / "cli"), "--key-file", _key(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and PID.decode() not in err and NAME.decode() not in err


def _key(tmp_path) -> str:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    return str(key)


def _deep(root: Path, depth: int) -> Path:
    """A folder ``depth`` levels deep (made one level at a time: os.makedirs recurses)."""
    path = root
    for _ in range(depth):
        path = path / "d"
        os.mkdir(path)
    return path


def test_a_folder_too_deep_is_a_typed_error_not_a_recursion(sample_dir, tmp_path, capsys):
    root = tmp_path / "deep"
    root.mkdir()
    bottom = _deep(root, 1100)
    (bottom / "x.dcm").write_bytes((sample_dir / "dicom" / "img_0001.dcm").read_bytes())
    try:
        with pytest.raises(InputTooLargeError, match="nested more than"):
            dicom_files([root])
        assert main(["deid", str(root), "--out", str(tmp_path / "out"), "--key-file", _key(tmp_path)]) != 0
        assert main(["info", str(root)]) != 0
    finally:  # removed here, from the bottom up: pytest's clean-up (shutil.rmtree) would recurse 1,100 deep
        (bottom / "x.dcm").unlink()
        while bottom != root:
            bottom.rmdir()
            bottom = bottom.parent
    err = capsys.readouterr().err
    assert "RecursionError" not in err and "Traceback" not in err and "nested more than" in err


@pytest.mark.parametrize("undefined", [False, True], ids=["explicit_lengths", "undefined_lengths"])
def test_sequences_nested_1000_deep_are_refused_at_once(sample_dir, tmp_path, undefined):
    """pydicom's remove_private_tags() walked every level at once, and its error at each level formatted the whole
    traceback: deid of one such 20 KB file ran for minutes. Now the levels are cleaned one by one, to 32."""
    import time

    from tools.fuzz.dicom_file import TAGS, DicomFile
    from tools.fuzz.mutators.dicom import nested_sequence

    d = DicomFile.parse(_bytes(_good(sample_dir)))
    d.put_raw(TAGS["ContentSequence"], nested_sequence(1000, d.explicit, d.little, undefined))
    src = tmp_path / "nested.dcm"
    src.write_bytes(d.to_bytes())
    t0 = time.process_time()  # (processor time: the refusal comes before the costly work, whatever the load)
    result = deidentify_files([src], tmp_path / "out", Deidentifier(key=KEY))
    assert time.process_time() - t0 < 5
    assert not result.written and len(result.errors) == 1 and result.errors[0].path == src
    # undefined lengths are parsed at once (the parser's RecursionError, typed); explicit ones level by level
    assert ("RecursionError" if undefined else "nested more than 32") in str(result.errors[0])
    shallow = DicomFile.parse(_bytes(_good(sample_dir)))
    shallow.put_raw(TAGS["ContentSequence"], nested_sequence(20, d.explicit, d.little, undefined))
    (tmp_path / "shallow.dcm").write_bytes(shallow.to_bytes())
    assert len(deidentify_files([tmp_path / "shallow.dcm"], tmp_path / "out2", Deidentifier(key=KEY)).written) == 1


def test_a_file_past_its_processor_time_is_skipped_and_the_rest_goes_on(sample_dir, tmp_path, monkeypatch):
    from medtl.clinical import deid as deid_module
    from medtl.io import ReadLimits, using_read_limits

    slow = tmp_path / "in" / "slow.dcm"
    slow.parent.mkdir()
    slow.write_bytes(_bytes(_good(sample_dir)))
    ds = _good(sample_dir)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    (tmp_path / "in" / "fast.dcm").write_bytes(_bytes(ds))
    real = deid_module.Deidentifier.dataset

    def dataset(self, ds, name=None):  # a file whose cleaning spins (as pydicom did on a 1,000-deep one)
        if Path(name).name == "slow.dcm":
            while True:
                pass
        return real(self, ds, name)

    monkeypatch.setattr(deid_module.Deidentifier, "dataset", dataset)
    with using_read_limits(ReadLimits(cpu_s=1)):
        result = deidentify_files(sorted((tmp_path / "in").iterdir()), tmp_path / "out", Deidentifier(key=KEY))
    assert len(result.written) == 1 and len(result.errors) == 1
    assert isinstance(result.errors[0], InputTooLargeError) and "processor time" in str(result.errors[0])
    assert result.errors[0].path == slow and not list((tmp_path / "out").rglob("*.part"))
