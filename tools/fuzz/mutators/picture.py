"""Picture mutators: PNG chunk lengths, IHDR fields (CRC recomputed), bad CRCs, damaged IDAT, dropped chunks;
JPEG markers and segments; TIFF IFD entries, strips and IFD loops."""

import struct
import zlib

from tools.fuzz.formats import png_chunk
from tools.fuzz.registry import mutator


def _is_png(seed) -> bool:
    return seed.data.startswith(b"\x89PNG")


def _is_jpeg(seed) -> bool:
    return seed.data.startswith(b"\xff\xd8")


def _is_tiff(seed) -> bool:
    return seed.data[:4] in (b"II*\x00", b"MM\x00*")


def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, type) of each chunk."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        n, kind = struct.unpack_from(">I4s", data, pos)
        out.append((pos, n, kind))
        pos += 12 + n
    return out


def _fix_crc(buf: bytearray, pos: int) -> None:
    n = struct.unpack_from(">I", buf, pos)[0]
    struct.pack_into(">I", buf, pos + 8 + n, zlib.crc32(bytes(buf[pos + 4 : pos + 8 + n])))


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
        w, h = rng.choice(
            [
                (100000, 100000),
                (0, 10),
                (10, 0),
                (0x7FFFFFFF, 1),
                (1, 0x7FFFFFFF),
                (65535, 65535),
                (0xFFFFFFFF, 0xFFFFFFFF),
            ]
        )
        struct.pack_into(">II", buf, 16, w, h)
        details = {"width": w, "height": h}
    else:
        offset = {"depth": 24, "colour": 25, "compression": 26, "filter": 27, "interlace": 28}[variant]
        value = rng.choice(
            {
                "depth": [0, 3, 7, 32, 16, 1],
                "colour": [1, 5, 7, 3, 4, 6],
                "compression": [1, 255],
                "filter": [1, 255],
                "interlace": [1, 2],
            }[variant]
        )
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
    pos, n, _ = next(c for c in _png_chunks(data) if c[2] == b"IDAT")
    body = data[pos + 8 : pos + 8 + n]
    variant = rng.choice(["flip", "short", "long", "not_zlib"])
    if variant == "flip":
        b = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        new = bytes(b)
    elif variant == "short":
        raw = zlib.decompress(body)
        new = zlib.compress(raw[: rng.randrange(len(raw))])
    elif variant == "long":
        raw = zlib.decompress(body)
        new = zlib.compress(raw + raw + rng.randbytes(100))
    else:
        new = rng.randbytes(len(body))
    return data[:pos] + png_chunk(b"IDAT", new) + data[pos + 12 + n :], {"variant": variant}


@mutator("picture", ("picture",), applies=_is_png)
def png_drop_chunk(data, rng, seed):
    pos, n, kind = rng.choice(_png_chunks(data))
    return data[:pos] + data[pos + 12 + n :], {"dropped": kind}


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int | None]]:
    """(offset, marker, length) of the segments up to and including the first SOS."""
    out: list[tuple[int, int, int | None]] = [(0, 0xD8, None)]
    pos = 2
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


def _jpeg_sof(buf: bytearray, pos: int, variant: str, rng) -> dict:
    """The start-of-frame segment at ``pos`` given another size, component count or precision."""
    if variant == "sof_size":
        h, w = rng.choice([(0, 16), (16, 0), (65535, 65535), (0, 0), (65535, 1)])
        struct.pack_into(">HH", buf, pos + 5, h, w)
        return {"variant": variant, "height": h, "width": w}
    offset, value = (
        (pos + 9, rng.choice([0, 255, 4, 2]))
        if variant == "sof_components"
        else (pos + 4, rng.choice([0, 12, 16, 255]))
    )
    buf[offset] = value
    return {"variant": variant, "value": value}


def _jpeg_segment_edit(buf: bytearray, segs: list, variant: str, rng) -> dict:
    """A marker replaced, a segment length changed, or a table's bytes overwritten."""
    if variant == "marker":
        pos, marker, _ = rng.choice(segs[1:])
        new = rng.choice([0x00, 0xFF, 0xC3, 0xCF, 0xDB, 0xC4, 0xD9, 0x01, rng.randrange(256)])
        buf[pos + 1] = new
        return {"variant": variant, "marker": f"{marker:02X}", "new": f"{new:02X}"}
    if variant == "length":
        pos, marker, n = rng.choice([s for s in segs if s[2] is not None])
        new = rng.choice([0, 1, 2, 0xFFFF, n + 1, n - 1])
        struct.pack_into(">H", buf, pos + 2, new)
        return {"variant": variant, "marker": f"{marker:02X}", "length": n, "new": new}
    tables = [s for s in segs if s[1] in (0xC4, 0xDB)] or segs[1:]
    pos, marker, n = rng.choice(tables)
    for _ in range(rng.randint(1, 6)):
        buf[pos + 4 + rng.randrange(max(1, (n or 2) - 2))] = rng.randrange(256)
    return {"variant": variant, "marker": f"{marker:02X}"}


@mutator("picture", ("picture",), applies=_is_jpeg)
def jpeg_marker(data, rng, seed):
    segs = _jpeg_segments(data)
    buf = bytearray(data)
    sofs = [s for s in segs if s[1] in (0xC0, 0xC1, 0xC2)]
    variant = rng.choice(
        ["marker", "length", "sof_size", "sof_components", "sof_precision", "table", "no_eoi", "cut_scan", "double_soi"]
    )
    if variant in ("sof_size", "sof_components", "sof_precision") and not sofs:
        variant = "marker"
    if variant in ("marker", "length", "table"):
        details = _jpeg_segment_edit(buf, segs, variant, rng)
        return bytes(buf), details
    if variant.startswith("sof"):
        details = _jpeg_sof(buf, sofs[0][0], variant, rng)
        return bytes(buf), details
    if variant == "no_eoi":
        return data[:-2] if data.endswith(b"\xff\xd9") else data[:-1], {"variant": variant}
    if variant == "cut_scan":
        start = segs[-1][0] + 4
        return data[: rng.randrange(start, len(data))], {"variant": variant}
    return data[:2] + b"\xff\xd8" + data[2:], {"variant": variant}


def _tiff_ifd(data: bytes) -> tuple[str, int, list[tuple[int, int, int, int]]]:
    """(byte order, offset of the first IFD, its entries as (offset, tag, type, count))."""
    e = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(e + "I", data, 4)[0]
    n = struct.unpack_from(e + "H", data, ifd)[0]
    entries = [(ifd + 2 + 12 * i, *struct.unpack_from(e + "HHI", data, ifd + 2 + 12 * i)) for i in range(n)]
    return e, ifd, entries


def _tiff_value(buf: bytearray, data: bytes, e: str, entries: list, rng) -> dict:
    """One entry's value (size, bits, compression, strips, ...) replaced."""
    choices = {
        256: [0, 0xFFFF, 100000, 0xFFFFFFFF],
        257: [0, 0xFFFF, 100000, 0xFFFFFFFF],
        258: [0, 3, 64, 255],
        259: [0, 7, 99, 65535, 5],
        262: [99, 3, 5],
        273: [len(data) + 10, 0xFFFFFFF0, 0],
        277: [0, 1000, 4],
        278: [0, 0xFFFFFFFF],
        279: [0, 0xFFFFFFFF, len(data) * 10],
        284: [2, 0, 9],
    }
    editable = [en for en in entries if en[1] in choices]
    pos, tag, typ, count = rng.choice(editable)
    value = rng.choice(choices[tag])
    if count == 1 and typ == 3:
        struct.pack_into(e + "HH", buf, pos + 8, value & 0xFFFF, 0)
    else:  # a LONG, or the offset of the values
        struct.pack_into(e + "I", buf, pos + 8, value & 0xFFFFFFFF)
    return {"variant": "value", "tag": tag, "value": value, "count": count}


def _tiff_structure(buf: bytearray, data: bytes, e: str, ifd: int, entries: list, variant: str, rng) -> dict:
    """The IFD's entry count, its next-IFD offset (a loop or out of the file), or an entry's type or count."""
    if variant == "entry_count":
        value = rng.choice([0, 0xFFFF, len(entries) + 3])
        struct.pack_into(e + "H", buf, ifd, value)
        return {"variant": variant, "value": value}
    next_pos = ifd + 2 + 12 * len(entries)
    if variant == "ifd_loop":  # the next IFD is this one again
        struct.pack_into(e + "I", buf, next_pos, ifd)
        return {"variant": variant}
    if variant == "ifd_offset":
        value = rng.choice([0, 1, len(data) + 100, 0xFFFFFFFF])
        which = rng.choice(["first", "next"])
        struct.pack_into(e + "I", buf, 4 if which == "first" else next_pos, value)
        return {"variant": variant, "which": which, "value": value}
    pos = rng.choice(entries)[0]
    if variant == "entry_type":
        value = rng.choice([0, 13, 99, 12])
        struct.pack_into(e + "H", buf, pos + 2, value)
    else:
        value = rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 1 << 20])
        struct.pack_into(e + "I", buf, pos + 4, value)
    return {"variant": variant, "value": value}


@mutator("picture", ("picture",), applies=_is_tiff)
def tiff_ifd(data, rng, seed):
    e, ifd, entries = _tiff_ifd(data)
    buf = bytearray(data)
    variant = rng.choice(
        ["value", "value", "value", "entry_count", "ifd_loop", "ifd_offset", "entry_type", "entry_count_huge"]
    )
    if variant == "value":
        details = _tiff_value(buf, data, e, entries, rng)
    else:
        details = _tiff_structure(buf, data, e, ifd, entries, variant, rng)
    return bytes(buf), details
