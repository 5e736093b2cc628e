"""Broken and hostile input: every signature found by mutating real files ends in a typed error,
memory bombs are refused before they allocate, colour/VOI/padding pixels match pydicom.

The broken files are made here from pydicom's own test file and from generated images.
"""

import contextlib
import gzip
import io
import struct
import time
import tracemalloc
import zipfile
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medtl.config import DataConfig
from medtl.errors import CorruptImageError, InputTooLargeError, MedtlInputError, UnsupportedFormatError
from medtl.io import ReadLimits, describe_path, read_image, read_image_bounded, using_read_limits
from medtl.transforms.intensity import intensity_preset, scale_intensity
from tools.bombs import write_deflated_bomb

SMALL = ReadLimits(max_bytes=64 << 20, max_files=50)


def _ct():
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


@contextlib.contextmanager
def _unchecked():
    settings = pydicom.config.settings
    before = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = before


def _peak(fn):
    """(result or exception, peak Python allocation in bytes) of fn()."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- the DICOM signatures that escaped untyped -------------------------------------------------

MARK = "0.111"  # a value written in place of a field, then overwritten in the file's bytes


@pytest.mark.parametrize(
    "change, raw, error, words",
    [
        (
            lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5"),
            None,
            UnsupportedFormatError,
            "transfer syntax",
        ),
        (
            lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", ExplicitVRLittleEndian),
            b"not-a-uid-at-all-xy\0",
            UnsupportedFormatError,
            "transfer syntax",
        ),
        (lambda ds: setattr(ds, "PixelData", b""), None, CorruptImageError, "empty"),
        (lambda ds: setattr(ds, "Rows", 4096), None, CorruptImageError, "pixel data holds"),
        (
            lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]),
            None,
            CorruptImageError,
            "mosaic",
        ),
        (lambda ds: setattr(ds, "PixelSpacing", [MARK, "1"]), b"abc  ", CorruptImageError, "PixelSpacing"),
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, MARK, 0, 1, 0]),
            b"x    ",
            CorruptImageError,
            "ImageOrientationPatient",
        ),
        (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), None, CorruptImageError, "parallel"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"), None, CorruptImageError, "palette"),
        (lambda ds: setattr(ds, "RescaleSlope", MARK), b"1e999", CorruptImageError, "RescaleSlope"),
        (lambda ds: setattr(ds, "BitsAllocated", 12), None, CorruptImageError, "BitsAllocated"),
        (lambda ds: setattr(ds, "SamplesPerPixel", 3), None, CorruptImageError, "SamplesPerPixel"),
        (
            lambda ds: (setattr(ds, "WindowWidth", 400), setattr(ds, "WindowCenter", MARK)),
            b"abc  ",
            CorruptImageError,
            "WindowCenter",
        ),
    ],
)
def test_broken_dicom_headers_are_typed_errors_naming_file_and_field(tmp_path, change, raw, error, words):
    ds = _ct()
    path = tmp_path / "broken.dcm"
    with _unchecked():
        change(ds)
        _save(ds, path)
    if raw is not None:  # values pydicom would not write: put them in the bytes
        data = path.read_bytes()
        old = MARK.encode() if len(raw) == len(MARK) else b"1.2.840.10008.1.2.1\0"
        assert data.count(old) == 1
        path.write_bytes(data.replace(old, raw))
    with pytest.raises(error, match=f"broken.dcm.*(?i:{words})"):
        read_image(path)
    assert describe_path(path)["usable"] is False


def test_unknown_vr_and_truncated_header_are_typed(tmp_path):
    raw = bytearray(open(get_testdata_file("CT_small.dcm"), "rb").read())
    at = raw.index(b"\x28\x00\x30\x00DS")  # (0028,0030) PixelSpacing, explicit VR
    raw[at + 4 : at + 6] = b"ZZ"
    (tmp_path / "vr.dcm").write_bytes(bytes(raw))
    try:  # pydicom reads an unknown VR as raw bytes: read or refused, but typed
        read_image(tmp_path / "vr.dcm")
    except MedtlInputError as e:
        assert "vr.dcm" in str(e)
    whole = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(whole[:700])  # ends inside the header, before the pixel data
    with pytest.raises(CorruptImageError, match="cut.dcm.*(truncated|ends inside)"):
        read_image(tmp_path / "cut.dcm")


def test_mutated_dicom_never_escapes_untyped(tmp_path):
    """Seeded byte mutations of a real file: each reads or raises a MedtlInputError, nothing else."""
    base = open(get_testdata_file("CT_small.dcm"), "rb").read()
    rng = np.random.default_rng(0)
    header_end = base.index(b"\xe0\x7f\x10\x00")
    outcomes = {"read": 0, "typed": 0}
    for i in range(150):
        raw = bytearray(base)
        kind = i % 3
        if kind == 0:  # flip bytes in the header
            for at in rng.integers(132, header_end, size=rng.integers(1, 8)):
                raw[at] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate anywhere
            raw = raw[: int(rng.integers(10, len(raw)))]
        else:  # a huge length on some element
            at = int(rng.integers(140, header_end - 8))
            raw[at : at + 4] = struct.pack("<I", 0xFFFFFFF0)
        path = tmp_path / f"m{i}.dcm"
        path.write_bytes(bytes(raw))
        try:
            read_image(path)
            outcomes["read"] += 1
        except MedtlInputError as e:
            assert f"m{i}.dcm" in str(e)
            outcomes["typed"] += 1
    assert outcomes["typed"] > 20 and sum(outcomes.values()) == 150


# -- memory bombs: refused fast, without allocating -------------------------------------------


def test_deflated_dicom_bomb_refused_fast_and_small(tmp_path):
    bomb = write_deflated_bomb(tmp_path / "bomb.dcm")  # 1 GiB of pixels, about 1 MB on disk
    assert bomb.stat().st_size < 3 << 20
    start = time.perf_counter()
    out, peak = _peak(lambda: read_image(bomb))
    assert isinstance(out, InputTooLargeError) and "bomb.dcm" in str(out), out
    assert time.perf_counter() - start < 1.0 and peak < 16 << 20, (time.perf_counter() - start, peak)


def test_deflated_dicom_is_read_and_matches_the_plain_one(tmp_path):
    ds = _ct()
    plain = _save(ds, tmp_path / "plain.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = _save(ds, tmp_path / "deflated.dcm")
    np.testing.assert_array_equal(read_image(deflated).array, read_image(plain).array)


def test_zip_bombs_refused_before_reading_and_bad_members_skipped(tmp_path):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(SMALL.max_files + 1):
            z.writestr(f"f{i}.dcm", b"x")
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", bytes(200 << 20))  # 200 MiB of zeros, about 200 KB compressed
    with using_read_limits(SMALL):
        start = time.perf_counter()
        with pytest.raises(InputTooLargeError, match="many.zip.*more than the limit"):
            read_image(many)
        out, peak = _peak(lambda: read_image(big))
        assert isinstance(out, InputTooLargeError) and "big.zip" in str(out), out
        assert peak < 8 << 20 and time.perf_counter() - start < 1.0
    mixed = tmp_path / "mixed.zip"
    good = open(get_testdata_file("CT_small.dcm"), "rb").read()
    with zipfile.ZipFile(mixed, "w") as z:
        z.writestr("good.dcm", good)
        z.writestr("bad.dcm", good[:300])
    report = describe_path(mixed)
    assert report["usable"] and [u["file"] for u in report["unreadable_files"]] == ["bad.dcm"]


def test_picture_bombs_and_broken_chunks_are_typed(tmp_path):
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    raw = bytearray(png.getvalue())
    huge = bytearray(raw)  # IHDR declaring 100000 x 100000 pixels, with a valid CRC
    huge[16:24] = struct.pack(">II", 100000, 100000)
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(huge))
    with pytest.raises(InputTooLargeError, match="huge.png"):
        read_image(tmp_path / "huge.png")
    for kind in (b"IDAT", b"tEXt"):  # a chunk length of 0x7FFFFFFF: read by Pillow's tolerance, or refused typed
        chunk = bytearray(raw)
        if kind == b"tEXt":
            at = chunk.index(b"IDAT") - 4
            chunk[at:at] = struct.pack(">I", 4) + b"tEXtab\0c" + struct.pack(">I", zlib.crc32(b"tEXtab\0c"))
        at = chunk.index(kind) - 4
        chunk[at : at + 4] = struct.pack(">I", 0x7FFFFFFF)
        (tmp_path / "chunk.png").write_bytes(bytes(chunk))
        try:
            read_image(tmp_path / "chunk.png")
        except MedtlInputError as e:
            assert "chunk.png" in str(e)
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")  # valid, but over a 64 MiB budget
    with (
        using_read_limits(ReadLimits(max_bytes=128 << 20)),
        pytest.raises(InputTooLargeError, match="big.png: a 3000x3000 picture needs"),
    ):
        read_image(tmp_path / "big.png")


def test_nifti_bombs_refused_before_allocating(tmp_path):
    vol = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.int16), np.eye(4)), vol)  # 32 MiB of int16, ~30 KB
    with using_read_limits(SMALL):
        out, peak = _peak(lambda: read_image(vol))
    assert isinstance(out, InputTooLargeError) and "zeros.nii.gz" in str(out) and peak < 8 << 20, (out, peak)
    small = tmp_path / "lying.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 8), np.int16), np.eye(4)), small)
    raw = bytearray(gzip.decompress(small.read_bytes()))
    raw[46:48] = struct.pack("<h", 32767)  # dim[3]: the header now declares 256 MiB
    small.write_bytes(gzip.compress(bytes(raw)))
    start = time.perf_counter()
    out, peak = _peak(lambda: read_image(small))
    assert isinstance(out, CorruptImageError) and "declares" in str(out), out
    assert peak < 8 << 20 and time.perf_counter() - start < 1.0


# -- correct pixels ----------------------------------------------------------------------------


def _colour_dicom(path, rgb: np.ndarray, photometric: str):
    ds = _ct()
    ds.Modality = "OT"
    for key in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if key in ds:
            delattr(ds, key)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        data = rgb.astype(np.uint8).tobytes()
    else:
        ybr = convert_color_space(rgb.astype(np.uint8), "RGB", "YBR_FULL")
        if photometric == "YBR_FULL":
            data = ybr.tobytes()
        else:  # YBR_FULL_422: Y1 Y2 Cb Cr for each pair of pixels, chroma averaged
            y, cb, cr = ybr[..., 0], ybr[..., 1].astype(int), ybr[..., 2].astype(int)
            pairs = np.stack(
                [
                    y[:, 0::2],
                    y[:, 1::2],
                    ((cb[:, 0::2] + cb[:, 1::2]) // 2).astype(np.uint8),
                    ((cr[:, 0::2] + cr[:, 1::2]) // 2).astype(np.uint8),
                ],
                axis=-1,
            )
            data = pairs.astype(np.uint8).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return _save(ds, path)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "YBR_FULL_422"])
def test_colour_dicom_decoded_once_equal_to_pydicom(tmp_path, photometric):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[...] = (200, 60, 30)
    rgb[4:, :4] = (20, 180, 90)
    path = _colour_dicom(tmp_path / f"{photometric}.dcm", rgb, photometric)
    reference = pydicom.dcmread(path).pixel_array.astype(np.float32)  # pydicom's RGB
    scan = read_image(path)
    np.testing.assert_array_equal(scan.rgb, reference)  # the colour kept, decoded once
    assert scan.value_max == 255
    grey = scan.array
    np.testing.assert_allclose(grey, reference @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-3)
    assert abs(grey[0, 0] - (0.299 * 200 + 0.587 * 60 + 0.114 * 30)) < 2.5  # 98.4, not 176.6


def _xray(tmp_path, name, **voi):
    ds = _ct()
    ds.Modality = "DX"
    ds.PixelData = np.linspace(0, 4000, 128 * 128).astype(np.int16).reshape(128, 128).tobytes()
    for k, v in voi.items():
        setattr(ds, k, v)
    return _save(ds, tmp_path / name)


def test_sigmoid_and_lut_voi_follow_pydicom(tmp_path):
    data = DataConfig()
    sig = _xray(tmp_path, "sigmoid.dcm", WindowCenter=1000, WindowWidth=800, VOILUTFunction="SIGMOID")
    ds = pydicom.dcmread(sig)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    bits = ds.BitsStored
    lo = -(2 ** (bits - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hi = (2 ** (bits - 1) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    scan = read_image(sig)
    assert intensity_preset(scan, "DX", data) == "file_window"
    got = scale_intensity(scan.array, "file_window", data, scan)[0]
    np.testing.assert_allclose(got, (expected - lo) / (hi - lo), atol=1e-5)
    assert got.min() < 0.05 and got.max() > 0.95  # a sigmoid, not clipped to a linear window

    lut = pydicom.Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "US", (np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16).tolist())
    tab = _xray(tmp_path, "lut.dcm", VOILUTSequence=pydicom.Sequence([lut]))
    ds = pydicom.dcmread(tab)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    scan = read_image(tab)
    got = scale_intensity(scan.array, "file_window", data, scan)[0]
    np.testing.assert_allclose(got, (expected - expected.min()) / (4095 - 0), atol=1e-4)


def test_padding_is_background_and_out_of_the_statistics(tmp_path):
    ds = _ct()
    ds.Modality = "MR"  # percentile scaling
    pixels = ds.pixel_array.copy()
    pixels[:, :40] = -2000  # outside the field of view
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.PixelPaddingValue = -2000
    scan = read_image(_save(ds, tmp_path / "padded.dcm"))
    assert scan.padding is not None and scan.padding[:, :40].all() and not scan.padding[:, 40:].any()
    real = apply_modality_lut(pixels, ds)[:, 40:]
    assert scan.array.min() == real.min()  # shown as the lowest real value, not -2000
    scaled = scale_intensity(scan.array, "percentile", DataConfig(), scan)[0]
    assert np.all(scaled[:, :40] == 0)
    lo, hi = np.percentile(real, DataConfig().percentiles)  # the percentiles of the real pixels only
    np.testing.assert_allclose(scaled[:, 40:], np.clip((real - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert scan.summary()["value_range"][0] == pytest.approx(float(real.min()))


# -- the bounded reader ------------------------------------------------------------------------


def test_bounded_reader_returns_the_scan_or_the_typed_error(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    np.testing.assert_array_equal(read_image_bounded(path).array, read_image(path).array)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(UnsupportedFormatError, match="junk.dcm"):
        read_image_bounded(tmp_path / "junk.dcm")
    with pytest.raises(InputTooLargeError, match="memory budget"):
        read_image_bounded(path, limits=ReadLimits(max_bytes=1000))
    big = tmp_path / "big.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).integers(0, 99, (160, 160, 160)).astype(np.int16), np.eye(4)), big
    )
    with pytest.raises(InputTooLargeError, match="longer than"):
        read_image_bounded(big, limits=ReadLimits(timeout_s=0.01))


def test_a_large_single_dicom_is_refused_before_its_pixels_are_read(tmp_path):
    ds = _ct()
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB of pixels, within what the file holds
    path = _save(ds, tmp_path / "large.dcm")
    with using_read_limits(ReadLimits(max_bytes=16 << 20)):
        out, peak = _peak(lambda: read_image(path))
    assert isinstance(out, InputTooLargeError) and "large.dcm" in str(out), out
    assert peak < 4 << 20, peak  # the pixel data stayed on disk


def test_header_values_stay_out_of_warnings_logs_and_errors(tmp_path, caplog, recwarn):
    ds = _ct()
    with _unchecked():
        ds.NumberOfFrames = "1"
        _save(ds, tmp_path / "named.dcm")
    data = (tmp_path / "named.dcm").read_bytes()
    at = data.index(b"\x28\x00\x08\x00IS")  # (0028,0008) NumberOfFrames: a name where a number belongs
    data = data[: at + 6] + struct.pack("<H", 6) + b"DOEJAN" + data[at + 10 :]
    (tmp_path / "named.dcm").write_bytes(data)
    with caplog.at_level("DEBUG"):
        with pytest.raises(MedtlInputError) as e:
            read_image(tmp_path / "named.dcm")
        _ = pydicom.dcmread(tmp_path / "named.dcm").NumberOfFrames  # pydicom's own log, through medtl's filter
    assert "DOEJAN" not in str(e.value) and "DOEJAN" not in caplog.text
    assert not any("DOEJAN" in str(w.message) for w in recwarn if "medtl" in w.filename)


def test_missing_files_are_file_missing_errors_for_every_reader(tmp_path):
    from medtl.errors import FileMissingError
    from medtl.io import read_dicom, read_nifti, read_picture

    for reader, name in (
        (read_dicom, "a.dcm"),
        (read_nifti, "a.nii.gz"),
        (read_picture, "a.png"),
        (read_image, "a.dcm"),
    ):
        with pytest.raises(FileMissingError, match=name):
            reader(tmp_path / name)


def test_the_bounded_reader_leaves_no_unpacked_members_behind(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        good = open(get_testdata_file("CT_small.dcm"), "rb").read()
        study = tmp_path / "study.zip"
        with zipfile.ZipFile(study, "w") as z:
            z.writestr("a.dcm", good)
            z.writestr("b.dcm", good[:300])
        read_image_bounded(study)  # read
        with pytest.raises(MedtlInputError):  # refused inside the child
            read_image_bounded(study, series_uid="1.2.3")
        big = tmp_path / "slow.zip"
        with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
            for i in range(160):  # 1.3 GB unpacked: more than any machine writes in 0.3 s
                z.writestr(f"{i}.dcm", bytes(8 << 20))
        with pytest.raises(InputTooLargeError, match="longer than"):  # killed while unpacking
            read_image_bounded(big, limits=ReadLimits(timeout_s=0.3))
        # (multiprocessing's own folder of this process, pymp-*, is removed when the process ends)
        assert [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("pymp-")] == []
    finally:
        tempfile.tempdir = None


def test_signed_monochrome1_is_inverted_within_its_stored_range(tmp_path):
    """MONOCHROME1 values are mirrored within the stored range: for signed 16-bit data, lo + hi = -1
    (an unsigned file cannot tell (lo + hi) - x from hi - x; the real files are all unsigned)."""
    ds = _ct()
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME1"
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    stored = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.int16)
    ds.PixelData = stored.tobytes()
    scan = read_image(_save(ds, tmp_path / "mono1.dcm"))
    np.testing.assert_array_equal(scan.array, (-32768 + 32767) - stored.astype(np.float32))
