"""Bombs: small files that inflate to GiBs (a deflated DICOM, a .nii.gz, a PNG, a zip member), made in
milliseconds by repeating one deflate segment of zeros."""

import struct
import zlib
from functools import cache, lru_cache

from tools.fuzz.dicom_file import TAGS, TS_DEFLATE, TS_EXPLICIT, DicomFile, encode, walk
from tools.fuzz.formats import nifti_endian, nifti_raw, png_chunk, zip_entries, zip_members
from tools.fuzz.registry import mutator

ZERO_CHUNK = 64 << 20
IMAGE_DESCRIPTION = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelRepresentation",
    "PlanarConfiguration",
    "PixelData",
)


@cache
def _zero_segment() -> bytes:
    """Raw deflate of ZERO_CHUNK zeros ending at a full flush: repeating it deflates more zeros."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(bytes(ZERO_CHUNK)) + c.flush(zlib.Z_FULL_FLUSH)


@cache
def deflated_zeros(n: int) -> bytes:
    """A complete raw deflate stream of ``n`` zero bytes, made in milliseconds whatever ``n``."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return _zero_segment() * (n // ZERO_CHUNK) + c.compress(bytes(n % ZERO_CHUNK)) + c.flush()


def deflated_then_zeros(head: bytes, n: int) -> bytes:
    """A raw deflate stream of ``head`` followed by ``n`` zero bytes."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(head) + c.flush(zlib.Z_FULL_FLUSH) + deflated_zeros(n)


@lru_cache(maxsize=64)
def crc_zeros(crc: int, n: int) -> int:
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
    d = DicomFile.parse(data)
    bits = rng.choice([8, 16])
    rows = cols = 16384
    frames = 4
    n = rows * cols * frames * bits // 8
    skip = {TAGS[k] for k in IMAGE_DESCRIPTION}
    if d.explicit and d.little:  # the seed's own header, less its image description
        head = b"".join(
            d.body[el.start : el.end] for el in d.body_elems() if el.tag not in skip and el.tag < TAGS["PixelData"]
        )
    else:
        head = b""
    bomb = DicomFile(d.prefix, d.meta, head, b"", TS_EXPLICIT, True, True, False)
    for name, value in (
        ("SamplesPerPixel", 1),
        ("PhotometricInterpretation", "MONOCHROME2"),
        ("NumberOfFrames", str(frames)),
        ("Rows", rows),
        ("Columns", cols),
        ("BitsAllocated", bits),
        ("BitsStored", bits),
        ("HighBit", bits - 1),
        ("PixelRepresentation", 0),
    ):
        bomb.put(name, value)
    pixel_head = encode(TAGS["PixelData"], b"OB" if bits == 8 else b"OW", b"", length=n)
    meta = d.meta
    tag = TAGS["TransferSyntaxUID"]
    el = next((x for x in walk(meta, True, True) if x.tag == tag), None)
    if el is not None:  # (a seed without one keeps its meta as it is)
        meta = meta[: el.start] + encode(tag, b"UI", TS_DEFLATE.encode()) + meta[el.end :]
    bomb.set_meta(meta)
    return bomb.prefix + bomb.meta + deflated_then_zeros(bomb.body + pixel_head, n), {
        "rows": rows,
        "columns": cols,
        "frames": frames,
        "bits": bits,
        "inflated_bytes": n,
    }


@mutator("bomb", ("nifti",))
def nii_gzip_bomb(data, rng, seed):
    """A .nii.gz whose header and stream agree on 1-2 GiB of zero voxels."""
    raw = nifti_raw(data, seed.gzipped)
    e = nifti_endian(raw)
    shape, code, bitpix = rng.choice(
        [((1024, 1024, 1024), 2, 8), ((1024, 1024, 512), 4, 16), ((2048, 1024, 256), 16, 32)]
    )
    hdr = bytearray(raw[:348] + b"\0" * 4)
    struct.pack_into(e + "8h", hdr, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into(e + "hh", hdr, 70, code, bitpix)
    struct.pack_into(e + "f", hdr, 108, 352.0)
    struct.pack_into(e + "ff", hdr, 112, 1.0, 0.0)
    hdr[344:348] = b"n+1\0"
    n = shape[0] * shape[1] * shape[2] * bitpix // 8
    crc = crc_zeros(zlib.crc32(bytes(hdr)), n)
    out = (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
        + deflated_then_zeros(bytes(hdr), n)
        + struct.pack("<II", crc, (len(hdr) + n) & 0xFFFFFFFF)
    )
    return out, {"shape": shape, "datatype": code, "inflated_bytes": n + len(hdr)}


@mutator("bomb", ("picture",))
def png_bomb(data, rng, seed):
    """A PNG of zeros whose IDAT inflates to (width + 1) x height bytes."""
    side = rng.choice([12000, 30000])
    n = (side + 1) * side
    idat = b"\x78\x9c" + deflated_zeros(n) + struct.pack(">I", (n % 65521) << 16 | 1)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
    return png, {"width": side, "height": side, "inflated_bytes": n}


@mutator("bomb", ("zip",))
def zip_bomb(data, rng, seed):
    """The series plus one member of zeros that inflates to 1, 1.5 or 3.75 GiB (its sizes and CRC are true)."""
    n = rng.choice([1 << 30, 0x60000000, 0xF0000000])
    entries = [
        (name, 0, body, zlib.crc32(body), len(body)) for name, body in zip_members(data) if not name.endswith("/")
    ]
    at = rng.randint(0, len(entries))
    entries.insert(at, ("IM_BOMB", 8, deflated_zeros(n), crc_zeros(0, n), n))
    return zip_entries(entries), {"inflated_bytes": n, "position": at}
