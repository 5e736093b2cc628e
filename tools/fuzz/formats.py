"""Byte-level helpers of the formats the seeds and mutators write: zips (with fixed dates, or by hand),
PNG chunks and NIfTI-1 headers."""

import gzip
import io
import struct
import warnings
import zipfile
import zlib

ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def zip_bytes(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
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


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    """The (name, bytes) members of a zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(m.filename, z.read(m)) for m in z.infolist()]


def zip_entries(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip written by hand from (name, method, stored bytes, crc, uncompressed size)."""
    out, central = bytearray(), bytearray()
    for name, method, stored, crc, size in entries:
        fname = name.encode()
        head = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x5021, crc, len(stored), size, len(fname), 0)
        central += (
            struct.pack(
                "<4s6H3I5H2I",
                b"PK\x01\x02",
                20,
                20,
                0,
                method,
                0,
                0x5021,
                crc,
                len(stored),
                size,
                len(fname),
                0,
                0,
                0,
                0,
                0o644 << 16,
                len(out),
            )
            + fname
        )
        out += head + fname + stored
    eocd = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + eocd)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def nifti_raw(data: bytes, gzipped: bool) -> bytes:
    """A NIfTI file's bytes, decompressed where it is a .nii.gz."""
    return gzip.decompress(data) if gzipped else data


def nifti_endian(raw: bytes) -> str:
    """The struct byte order ("<" or ">") of a NIfTI-1 header, from its sizeof_hdr."""
    if struct.unpack_from("<i", raw, 0)[0] == 348:
        return "<"
    if struct.unpack_from(">i", raw, 0)[0] == 348:
        return ">"
    raise ValueError("not a NIfTI-1 header")


def gzip_fast(raw: bytes) -> bytes:
    """gzip at level 1 with a zero time stamp (the same bytes every time)."""
    return gzip.compress(raw, 1, mtime=0)
