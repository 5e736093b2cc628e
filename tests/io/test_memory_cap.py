"""The bounded reader's budget is a cap (issue 33): files built like the held-out fuzz's worst (a small palette
PNG, a scaled int16 NIfTI and a deflated CT whose decoded size passes the header check but whose real peak did
not) are read or refused with a typed error, and the child's resident memory never grows by more than the
budget; a codestream declaring another size than its DICOM header is refused before decoding; a file that
takes too long in processor time is stopped with a typed error; a 2D NIfTI is read. The files are generated
here, small, with budgets scaled to them."""

import io
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from medtl.errors import CorruptImageError, InputTooLargeError
from medtl.io import ReadLimits, read_image, read_image_bounded
from medtl.io import bounded as bounded_module

MiB = 1 << 20


def _ct(rows: int, cols: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = rows, cols
    return ds


def _palette_png(path: Path, n: int) -> Path:
    im = Image.new("P", (n, n))
    im.putpalette(list(range(256)) * 3)
    im.save(path, optimize=True)
    return path


def _scaled_nifti(path: Path, shape) -> Path:
    img = nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, 3)
    nib.save(img, path)
    return path


def _deflated_ct(path: Path, n: int) -> Path:
    ds = _ct(n, n)
    ds.PixelData = np.zeros((n, n), np.int16).tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


# (file maker, budget): the decoded size passes the header check under the budget, the old reader's real peak
# did not stay under it (palette: RGB and float copies; NIfTI: nibabel's float64 scaling; deflated: the inflated
# stream held twice)
CASES = {
    "palette_png": (lambda d: _palette_png(d / "p.png", 3000), 200 * MiB),
    "scaled_nifti": (lambda d: _scaled_nifti(d / "s.nii.gz", (300, 300, 240)), 200 * MiB),
    "deflated_ct": (lambda d: _deflated_ct(d / "d.dcm", 3000), 150 * MiB),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_child_never_grows_past_its_budget(case, tmp_path):
    make, budget = CASES[case]
    path = make(tmp_path)
    memory: dict = {}
    try:
        read_image_bounded(path, limits=ReadLimits(max_bytes=budget), memory=memory)
    except InputTooLargeError as e:
        assert str(path) in str(e)
    grown = (memory["peak_kib"] - memory["baseline_kib"]) * 1024
    assert 0 < grown <= budget, f"{case}: grew {grown / MiB:.0f} MiB under a {budget / MiB:.0f} MiB budget"


def test_within_the_cap_a_large_legitimate_read_succeeds_and_comes_back_writable(tmp_path):
    """The arrays come back out of band (no pickle copy in the child): a read near the budget still succeeds."""
    path = _palette_png(tmp_path / "p.png", 2000)
    memory: dict = {}
    scan = read_image_bounded(path, limits=ReadLimits(max_bytes=160 * MiB), memory=memory)
    assert scan.array.shape == (2000, 2000) and scan.array.flags.writeable
    assert (memory["peak_kib"] - memory["baseline_kib"]) * 1024 <= 160 * MiB


def _j2k_lie(path: Path, real: int, header: int) -> Path:
    ds = _ct(real, real)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.compress(JPEG2000Lossless, np.zeros((real, real), np.uint16))
    ds.Rows = ds.Columns = header
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_lie(path: Path, real: int, header: int) -> Path:
    buf = io.BytesIO()
    Image.new("L", (real, real)).save(buf, format="JPEG")
    ds = _ct(header, header)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("make", [_j2k_lie, _jpeg_lie], ids=["jpeg2000", "jpeg"])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(make, tmp_path):
    path = make(tmp_path / "lie.dcm", 3000, 64)
    assert path.stat().st_size < 200_000  # a small file: the header says 64 x 64
    with pytest.raises(CorruptImageError, match=r"compressed image is 3000 x 3000.*refused before decoding"):
        read_image(path)
    honest = make(tmp_path / "honest.dcm", 64, 64)
    assert read_image(honest).array.shape == (64, 64)  # the check does not refuse a file that tells the truth


def test_a_read_past_its_processor_time_is_stopped_with_a_typed_error(tmp_path):
    ds = _ct(1, 1)
    n = 200_000  # 1x1 frames: ~19 s of processor time here
    ds.NumberOfFrames, ds.PixelData = n, np.zeros(n, np.int16).tobytes()
    ds.save_as(tmp_path / "frames.dcm", enforce_file_format=True)
    with pytest.raises(InputTooLargeError, match="processor time"):  # (the frame limit raised: the CPU one is hit)
        read_image_bounded(tmp_path / "frames.dcm", limits=ReadLimits(cpu_s=1, max_frames=10**7))
    import signal

    from medtl.io import using_read_limits

    with using_read_limits(ReadLimits(cpu_s=1, max_frames=10**7)):  # in-process: the profiling timer stops it
        t0 = time.process_time()
        with pytest.raises(InputTooLargeError, match="1 s of processor time"):
            read_image(tmp_path / "frames.dcm")
        assert time.process_time() - t0 < 3
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0) and signal.getsignal(signal.SIGPROF) == signal.SIG_DFL
    t0 = time.process_time()  # (processor time: the refusal comes before the costly work, whatever the load)
    with pytest.raises(InputTooLargeError, match="200000 frames, more than the 20000"):  # in-process, at once
        read_image(tmp_path / "frames.dcm")
    assert time.process_time() - t0 < 5


def _progressive_jpeg(path: Path, scans: int | None = None) -> Path:
    """A progressive JPEG; with ``scans``, its first scan repeated until it has that many (the held-out fuzz's
    6,000-scan file took Pillow 41 s)."""
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(
        buf, format="JPEG", progressive=True
    )
    data = buf.getvalue()
    if scans:
        first = data.index(b"\xff\xda")
        second = data.index(b"\xff\xda", first + 2)
        scan = data[first:second]
        data = data[:first] + scan * (scans - data.count(b"\xff\xda") + 1) + data[second:]
    path.write_bytes(data)
    return path


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path):
    assert read_image(_progressive_jpeg(tmp_path / "ok.jpg")).array.shape == (64, 64)
    flood = _progressive_jpeg(tmp_path / "flood.jpg", scans=3000)
    t0 = time.process_time()  # (processor time: the refusal comes before the costly work, whatever the load)
    with pytest.raises(InputTooLargeError, match="JPEG of 3000 scans"):
        read_image(flood)
    assert time.process_time() - t0 < 5


def test_a_2d_nifti_is_read(tmp_path):
    img = nib.Nifti1Image(np.arange(12, dtype=np.int16).reshape(3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, 3)
    nib.save(img, tmp_path / "flat.nii.gz")
    scan = read_image(tmp_path / "flat.nii.gz")
    assert scan.array.shape == (1, 4, 3) and scan.spacing == (1.0, 1.0, 1.0)
    assert sorted(scan.array.ravel().tolist()) == sorted((np.arange(12) * 0.5 + 3).tolist())


def test_the_scratch_folder_is_removed_when_the_child_cannot_start(tmp_path, monkeypatch):
    class Refused(RuntimeError):
        pass

    def no_start(self):
        raise Refused("no process")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bounded_module._ctx().Process, "start", no_start)
    with pytest.raises(Refused):
        read_image_bounded(_palette_png(tmp_path / "p.png", 8))
    assert not list(tmp_path.glob("medtl-read-*"))


def test_the_header_scan_of_predict_recursive_does_not_inflate_a_deflated_bomb(tmp_path):
    """``medtl predict --recursive`` groups DICOM files by study from their headers, in-process: a deflated file's
    header is inflated alone (pydicom inflated the whole stream: 4.1 GB for a 3 MB file in the held-out fuzz)."""
    import tracemalloc

    from medtl.predict.batch import find_inputs
    from tools.bombs import write_deflated_bomb

    folder = tmp_path / "in"
    folder.mkdir()
    write_deflated_bomb(folder / "bomb.dcm", rows=8192, cols=8192, frames=2)  # 256 MiB of pixels, deflated
    tracemalloc.start()
    try:
        with find_inputs([folder], recursive=True) as inputs:
            found = list(inputs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) == 1 and peak < 40 * MiB, peak / MiB


def test_nifti_header_extensions_are_checked_before_nibabel_parses_them(tmp_path):
    def save(name, extensions):
        img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4))
        for content in extensions:
            img.header.extensions.append(nib.nifti1.Nifti1Extension(4, content))
        nib.save(img, tmp_path / name)
        return tmp_path / name

    assert read_image(save("one.nii.gz", [b"a comment"])).array.shape == (4, 8, 8)  # a usual extension reads
    with pytest.raises(InputTooLargeError, match="more than 64 extensions"):
        read_image(save("flood.nii.gz", [b"x"] * 5000))
    data = bytearray(save("seven.nii", [b"a comment"]).read_bytes())
    data[352:356] = (7).to_bytes(4, "little")  # an extension of 7 bytes: nibabel read the whole stream as one
    (tmp_path / "seven.nii").write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="extension of 7 bytes"):
        read_image(tmp_path / "seven.nii")


def _deflated_with_big_element(path: Path, n: int) -> Path:
    """A deflated DICOM whose Content Sequence item holds an OB element of ``n`` zero bytes (the held-out fuzz's
    2 MB file held 1.9 GiB): the header check sees no large pixels, the inflated stream is large."""
    import struct
    import zlib

    ds = _ct(16, 16)
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    body = buf.getvalue()
    at = body.index(b"\xe0\x7f\x10\x00")  # the pixel data element: the sequence goes before it
    sequence = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    sequence += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    sequence += struct.pack("<HH2sHI", 0x0042, 0x0011, b"OB", 0, n)
    tail = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + body[at:]
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body[:at] + sequence)]
    for _ in range(n >> 20):
        parts.append(comp.compress(bytes(1 << 20)))
    parts += [comp.compress(tail), comp.flush()]
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.generate_uid()
    head = pydicom.filebase.DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(head, meta, enforce_standard=True)
    path.write_bytes(head.getvalue() + b"".join(parts))
    return path


def test_a_deflated_stream_with_a_huge_element_stays_within_the_budget_in_process(tmp_path):
    """Read in-process (medtl deid, training): the inflated stream is held, copied and its values copied out, so it
    may inflate to a third of the budget; the file is refused with the peak under the budget (it was 3 x 1.9 GiB)."""
    import tracemalloc

    from medtl.clinical.deid import deidentify_files
    from medtl.io import using_read_limits

    path = _deflated_with_big_element(tmp_path / "big.dcm", 300 * MiB)
    assert path.stat().st_size < 2 * MiB
    budget = 256 * MiB
    with using_read_limits(ReadLimits(max_bytes=budget)):
        for run in (lambda: read_image(path), lambda: deidentify_files([path], tmp_path / "out")):
            tracemalloc.start()
            try:
                outcome = run()
            except InputTooLargeError:
                outcome = "refused"
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            assert peak < budget, peak / MiB
            assert outcome == "refused" or isinstance(outcome.errors[0], InputTooLargeError)
