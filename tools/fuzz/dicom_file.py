"""A DICOM file as its encoded elements (tag, VR, length, value), edited in place, so values pydicom would
refuse to write (a DS of 'abc', a length of 0xFFFFFFFE) are written all the same."""

import struct
import zlib
from dataclasses import dataclass

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ITEM, ITEM_END, SEQ_END, UNDEFINED = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0xFFFFFFFF
TS_IMPLICIT, TS_EXPLICIT, TS_BIG, TS_DEFLATE = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
)
TAGS = {
    "TransferSyntaxUID": 0x00020010,
    "ImageType": 0x00080008,
    "SOPClassUID": 0x00080016,
    "Modality": 0x00080060,
    "Manufacturer": 0x00080070,
    "SliceThickness": 0x00180050,
    "SpacingBetweenSlices": 0x00180088,
    "ImagerPixelSpacing": 0x00181164,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004,
    "PlanarConfiguration": 0x00280006,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "PixelRepresentation": 0x00280103,
    "WindowCenter": 0x00281050,
    "WindowWidth": 0x00281051,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
    "ContentSequence": 0x0040A730,
    "PixelData": 0x7FE00010,
}
VRS = {
    "TransferSyntaxUID": b"UI",
    "ImageType": b"CS",
    "SOPClassUID": b"UI",
    "Modality": b"CS",
    "Manufacturer": b"LO",
    "SamplesPerPixel": b"US",
    "PhotometricInterpretation": b"CS",
    "PlanarConfiguration": b"US",
    "NumberOfFrames": b"IS",
    "Rows": b"US",
    "Columns": b"US",
    "BitsAllocated": b"US",
    "BitsStored": b"US",
    "HighBit": b"US",
    "PixelRepresentation": b"US",
    "ContentSequence": b"SQ",
    "PixelData": b"OB",
}


@dataclass
class Elem:
    """Where one encoded element lies in its buffer."""

    tag: int
    vr: bytes | None
    start: int  # first byte of the tag
    len_pos: int  # where its length is written
    len_size: int  # 2 or 4 bytes
    value: int  # first byte of the value
    end: int  # just past the element (past the delimiter for undefined lengths)
    length: int  # as written


def read_elem(buf: bytes, pos: int, explicit: bool, little: bool, depth: int = 0) -> Elem:
    """The element whose tag starts at ``pos``."""
    e = "<" if little else ">"
    if pos + 8 > len(buf):
        raise ValueError(f"element at {pos} truncated")
    group, element = struct.unpack_from(e + "HH", buf, pos)
    tag = group << 16 | element
    if group == 0xFFFE or not explicit:
        vr, len_pos, size = None, pos + 4, 4
    else:
        vr = bytes(buf[pos + 4 : pos + 6])
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


def _skip_item(buf: bytes, pos: int, explicit: bool, little: bool, depth: int) -> int:
    """The offset just past the item delimiter that closes the undefined-length item whose value starts at ``pos``."""
    e = "<" if little else ">"
    while True:
        if pos + 8 > len(buf):
            raise ValueError("item without its delimiter")
        if struct.unpack_from(e + "HH", buf, pos) == (0xFFFE, 0xE00D):
            return pos + 8
        pos = read_elem(buf, pos, explicit, little, depth + 1).end


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
        pos = pos + length if length != UNDEFINED else _skip_item(buf, pos, explicit, little, depth)


def walk(buf: bytes, explicit: bool, little: bool, start: int = 0, group: int | None = None) -> list[Elem]:
    """The top-level elements of ``buf`` from ``start`` (stopping at the first of another group, if given)."""
    out, pos = [], start
    while pos + 8 <= len(buf):
        if group is not None and struct.unpack_from("<H", buf, pos)[0] != group:
            break
        el = read_elem(buf, pos, explicit, little)
        out.append(el)
        pos = el.end
    return out


def encode(
    tag: int, vr: bytes | None, value: bytes, explicit: bool = True, little: bool = True, length: int | None = None
) -> bytes:
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


def value_bytes(vr: bytes, value, little: bool = True) -> bytes:
    """A value encoded for ``vr``: binary for US/SS/UL/SL (unsigned values wrap), text otherwise."""
    e = "<" if little else ">"
    if vr in (b"US", b"SS", b"UL", b"SL"):  # unsigned values wrap (-1 is written as 0xFFFF)
        fmt, mask = {b"US": ("H", 0xFFFF), b"SS": ("h", None), b"UL": ("I", 0xFFFFFFFF), b"SL": ("i", None)}[vr]
        values = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack(e + fmt, int(v) & mask if mask else int(v)) for v in values)
    if isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def replace_meta_element(meta: bytes, tag: int, encoded: bytes) -> bytes:
    """The file meta group with element ``tag`` replaced by ``encoded`` (inserted in tag order if absent)."""
    elems = walk(meta, True, True)
    el = next((x for x in elems if x.tag == tag), None)
    if el is not None:
        return meta[: el.start] + encoded + meta[el.end :]
    at = next((x.start for x in elems if x.tag > tag), len(meta))
    return meta[:at] + encoded + meta[at:]


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
        meta_elems = walk(data, True, True, pos, group=2)
        meta_end = meta_elems[-1].end if meta_elems else pos
        ts = ""
        for el in meta_elems:
            if el.tag == TAGS["TransferSyntaxUID"]:
                ts = data[el.value : el.end].rstrip(b"\0 ").decode("latin-1")
        raw_body = data[meta_end:]
        if not ts:  # no file meta: guess the encoding as pydicom does, from the first element's VR
            ts = TS_EXPLICIT if raw_body[4:6].isalpha() and raw_body[4:6].isupper() else TS_IMPLICIT
        deflated = ts == TS_DEFLATE
        body = zlib.decompress(raw_body, -15) if deflated else raw_body
        return cls(data[:pos], data[pos:meta_end], body, raw_body, ts, ts != TS_IMPLICIT, ts != TS_BIG, deflated)

    def meta_elems(self) -> list[Elem]:
        return walk(self.meta, True, True)

    def body_elems(self) -> list[Elem]:
        return walk(self.body, self.explicit, self.little)

    def find(self, name: str) -> Elem | None:
        return next((el for el in self.body_elems() if el.tag == TAGS[name]), None)

    def get_int(self, name: str, default: int = 0) -> int:
        el = self.find(name)
        if el is None or el.end - el.value < 2:
            return default
        if el.vr in (b"IS", b"DS"):
            return int(float(self.body[el.value : el.end].strip(b"\0 ")))
        return struct.unpack_from("<H" if self.little else ">H", self.body, el.value)[0]

    def put(self, name: str, value, vr: bytes | None = None) -> None:
        """Set a body element (keeping its VR when present), or insert it in tag order."""
        tag = TAGS[name]
        el = self.find(name)
        vr = (el.vr if el is not None and el.vr else None) or vr or VRS.get(name, b"DS")
        raw = value_bytes(vr, value, self.little) if not isinstance(value, bytes) else value
        self.put_raw(tag, encode(tag, vr, raw, self.explicit, self.little))

    def put_raw(self, tag: int, encoded: bytes) -> None:
        elems = self.body_elems()
        el = next((x for x in elems if x.tag == tag), None)
        if el is not None:
            self.body = self.body[: el.start] + encoded + self.body[el.end :]
            return
        at = next((x.start for x in elems if x.tag > tag), len(self.body))
        self.body = self.body[:at] + encoded + self.body[at:]

    def remove(self, name: str) -> bool:
        el = self.find(name)
        if el is None:
            return False
        self.body = self.body[: el.start] + self.body[el.end :]
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
