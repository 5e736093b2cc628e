"""DICOM mutators, on the encoded elements: lengths, VRs, transfer syntax, nested sequences, image
description fields, MOSAIC and CSA headers, garbage strings, pixel data, removed elements."""

import struct

from tools.fuzz.dicom_file import (
    TAGS,
    TS_BIG,
    TS_DEFLATE,
    TS_EXPLICIT,
    TS_IMPLICIT,
    UNDEFINED,
    DicomFile,
    encode,
    replace_meta_element,
)
from tools.fuzz.registry import mutator

TS_CHOICES = (
    TS_IMPLICIT,
    TS_EXPLICIT,
    TS_BIG,
    TS_DEFLATE,
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.5",
    "1.2.3.4.5.6",
    "abc",
    "",
    "1..2",
    "1.2.840.10008.1.2\\1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99.1",
    "\x00\x01\x02",
)
GARBAGE_FIELDS = (
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImagerPixelSpacing",
)
GARBAGE_VALUES = (
    "abc",
    "1\\2\\3",
    "nan",
    "1e400",
    "-inf",
    "",
    "0",
    "0\\0",
    "1\\0\\0\\0\\0",
    "-1\\-1",
    "1\\2\\3\\4\\5\\6\\7",
    "1e308\\1e308",
    " \\ ",
    "nan\\nan\\nan\\nan\\nan\\nan",
    "0\\0\\0\\0\\0\\0",
)
REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SOPClassUID",
    "Modality",
    "NumberOfFrames",
    "PixelData",
)


@mutator("dicom", ("dicom",))
def dcm_huge_length(data, rng, seed):
    d = DicomFile.parse(data)
    where, elems = "body", d.body_elems()
    if not elems or rng.random() < 0.15:
        where, elems = "meta", d.meta_elems()
    pixel = [el for el in elems if el.tag == TAGS["PixelData"]]
    el = pixel[0] if pixel and rng.random() < 0.3 else rng.choice(elems)
    buf = bytearray(d.body if where == "body" else d.meta)
    if el.len_size == 4:
        new = rng.choice([0xFFFFFFFE, 0x7FFFFFFF, 0xFFFFFFF0, len(buf) + rng.randint(1, 1 << 20)])
        fmt = "I"
    else:
        new = rng.choice([0xFFFF, 0xFFFE, min(0xFFFF, el.length + rng.randint(1, 512))])
        fmt = "H"
    little = d.little if where == "body" else True
    struct.pack_into(("<" if little else ">") + fmt, buf, el.len_pos, new)
    if where == "body":
        d.body = bytes(buf)
    else:
        d.meta = bytes(buf)
    return d.to_bytes(), {"where": where, "tag": f"{el.tag:08X}", "vr": el.vr, "length": el.length, "new": new}


@mutator("dicom", ("dicom",))
def dcm_vr_swap(data, rng, seed):
    d = DicomFile.parse(data)
    where = "body" if d.explicit and rng.random() < 0.85 else "meta"
    elems = [el for el in (d.body_elems() if where == "body" else d.meta_elems()) if el.vr]
    el = rng.choice(elems)
    new = rng.choice(
        [
            v
            for v in (b"ZZ", b"\0\0", b"SQ", b"OB", b"OW", b"UN", b"US", b"DS", b"UT", b"AT", b"FD", b"UL", b"ox")
            if v != el.vr
        ]
    )
    buf = bytearray(d.body if where == "body" else d.meta)
    buf[el.start + 4 : el.start + 6] = new
    if where == "body":
        d.body = bytes(buf)
    else:
        d.meta = bytes(buf)
    return d.to_bytes(), {"where": where, "tag": f"{el.tag:08X}", "vr": el.vr, "new": new}


@mutator("dicom", ("dicom",))
def dcm_ts_swap(data, rng, seed):
    """A new transfer syntax in the file meta; the body is left as it was encoded (and compressed)."""
    d = DicomFile.parse(data)
    new = rng.choice([t for t in TS_CHOICES if t != d.ts])
    tag = TAGS["TransferSyntaxUID"]
    d.set_meta(replace_meta_element(d.meta, tag, encode(tag, b"UI", new.encode("latin-1"))))
    return d.prefix + d.meta + d.raw_body, {"from": d.ts, "to": new}


def nested_sequence(depth: int, explicit: bool, little: bool, undefined: bool) -> bytes:
    """A ContentSequence nested ``depth`` deep, with undefined or explicit lengths."""
    e = "<" if little else ">"
    tag = TAGS["ContentSequence"]
    inner = encode(0x00080100, b"SH", b"FUZZ", explicit, little)
    for _ in range(depth):
        if undefined:
            item = struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEFINED) + inner + struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
            inner = encode(
                tag, b"SQ", item + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0), explicit, little, length=UNDEFINED
            )
        else:
            item = struct.pack(e + "HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = encode(tag, b"SQ", item, explicit, little)
    return inner


@mutator("dicom", ("dicom",))
def dcm_nested_seq(data, rng, seed):
    d = DicomFile.parse(data)
    depth, undefined = rng.choice([20, 200, 200, 500, 1000]), rng.random() < 0.5
    d.put_raw(TAGS["ContentSequence"], nested_sequence(depth, d.explicit, d.little, undefined))
    return d.to_bytes(), {"depth": depth, "undefined_length": undefined}


@mutator("dicom", ("dicom",))
def dcm_rows_cols(data, rng, seed):
    d = DicomFile.parse(data)
    which, value = rng.choice(["Rows", "Columns", "both"]), rng.choice([0, 1, 65535])
    for name in ["Rows", "Columns"] if which == "both" else [which]:
        d.put(name, value)
    return d.to_bytes(), {"field": which, "value": value}


@mutator("dicom", ("dicom",))
def dcm_bits(data, rng, seed):
    d = DicomFile.parse(data)
    variant = rng.choice(["allocated", "stored_over_allocated", "high_bit", "pixel_representation"])
    if variant == "allocated":
        name, value = "BitsAllocated", rng.choice([0, 1, 7, 12, 64])
    elif variant == "stored_over_allocated":
        name, value = "BitsStored", d.get_int("BitsAllocated", 16) + rng.randint(1, 8)
    elif variant == "high_bit":
        name, value = "HighBit", rng.choice([0, 63, 255])
    else:
        name, value = "PixelRepresentation", rng.choice([2, 65535])
    d.put(name, value)
    return d.to_bytes(), {"field": name, "value": value}


@mutator("dicom", ("dicom",))
def dcm_frames(data, rng, seed):
    d = DicomFile.parse(data)
    value = rng.choice(["0", "-1", "abc", "100000", "1.5", "", "1e9", "2147483648", " "])
    d.put("NumberOfFrames", value)
    return d.to_bytes(), {"NumberOfFrames": value}


@mutator("dicom", ("dicom",))
def dcm_samples(data, rng, seed):
    d = DicomFile.parse(data)
    variant = rng.choice(["3_with_monochrome2", "samples", "planar"])
    if variant == "3_with_monochrome2":
        d.put("SamplesPerPixel", 3)
        d.put("PhotometricInterpretation", "MONOCHROME2")
        return d.to_bytes(), {"SamplesPerPixel": 3, "PhotometricInterpretation": "MONOCHROME2"}
    if variant == "samples":
        value = rng.choice([0, 4, 65535])
        d.put("SamplesPerPixel", value)
        return d.to_bytes(), {"SamplesPerPixel": value}
    value = rng.choice([1, 7])
    d.put("PlanarConfiguration", value)
    return d.to_bytes(), {"PlanarConfiguration": value}


@mutator("dicom", ("dicom",))
def dcm_photometric(data, rng, seed):
    d = DicomFile.parse(data)
    value = rng.choice(
        ["PALETTE COLOR", "YBR_FULL_422", "YBR_FULL", "RGB", "MONOCHROME1", "YBR_ICT", "ABC", "", "MONOCHROME2\\RGB"]
    )
    d.put("PhotometricInterpretation", value)
    removed = []
    if value == "PALETTE COLOR":  # without its lookup tables
        for tag in (0x00281101, 0x00281102, 0x00281103, 0x00281201, 0x00281202, 0x00281203):
            el = next((x for x in d.body_elems() if x.tag == tag), None)
            if el is not None:
                d.body = d.body[: el.start] + d.body[el.end :]
                removed.append(f"{tag:08X}")
    return d.to_bytes(), {"PhotometricInterpretation": value, "removed": removed}


@mutator("dicom", ("dicom",))
def dcm_mosaic(data, rng, seed):
    d = DicomFile.parse(data)
    csa = [
        el
        for el in d.body_elems()
        if el.tag >> 16 == 0x0029 and (el.tag & 0xFF) in (0x10, 0x20) and el.end - el.value > 16
    ]
    variant = rng.choice(["mark", "mark_siemens"] + (["csa_bytes", "csa_truncate"] if csa else []))
    if variant.startswith("mark"):
        d.put("ImageType", "ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC")
        if variant == "mark_siemens":
            d.put("Manufacturer", "SIEMENS")
        return d.to_bytes(), {"variant": variant}
    el = rng.choice(csa)
    value = bytearray(d.body[el.value : el.end])
    if variant == "csa_bytes":
        for _ in range(rng.randint(1, 16)):
            off = rng.randrange(len(value))
            value[off] = rng.choice([0x00, 0xFF, rng.randrange(256)])
    else:
        value = value[: rng.randrange(8, len(value))]
    d.put_raw(el.tag, encode(el.tag, el.vr or b"OB", bytes(value), d.explicit, d.little))
    return d.to_bytes(), {"variant": variant, "tag": f"{el.tag:08X}"}


@mutator("dicom", ("dicom",))
def dcm_garbage_value(data, rng, seed):
    d = DicomFile.parse(data)
    name, value = rng.choice(GARBAGE_FIELDS), rng.choice(GARBAGE_VALUES)
    d.put(name, value, b"DS")
    return d.to_bytes(), {"field": name, "value": value}


def _encapsulated_pixeldata(d: DicomFile, el, rng) -> dict:
    """Encapsulated fragments emptied, a length made huge, the delimiter dropped or the value cut."""
    tag = TAGS["PixelData"]
    variant = rng.choice(["empty", "fragment_length", "no_delimiter", "cut"])
    if variant == "empty":
        d.put_raw(tag, encode(tag, el.vr or b"OB", b"", d.explicit, d.little))
    elif variant == "fragment_length":  # the offset table's or a fragment's length made huge
        items, pos = [], el.value
        while pos + 8 <= el.end - 8:
            items.append(pos)
            pos += 8 + struct.unpack_from("<I", d.body, pos + 4)[0]
        at = rng.choice(items)
        buf = bytearray(d.body)
        struct.pack_into("<I", buf, at + 4, rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(buf)]))
        d.body = bytes(buf)
    elif variant == "no_delimiter":
        d.body = d.body[: el.end - 8] + d.body[el.end :]
    else:
        d.body = d.body[: rng.randrange(el.value, el.end)]
    return {"encapsulated": True, "variant": variant}


@mutator("dicom", ("dicom",))
def dcm_pixeldata(data, rng, seed):
    d = DicomFile.parse(data)
    el = d.find("PixelData")
    if el is None:
        raise ValueError("no PixelData")
    if el.length == UNDEFINED:
        details = _encapsulated_pixeldata(d, el, rng)
        return d.to_bytes(), details
    value = d.body[el.value : el.end]
    variant = rng.choice(["empty", "shorter", "longer", "odd"])
    if variant == "empty":
        new = b""
    elif variant == "shorter":
        new = value[: rng.randrange(max(1, len(value)))]
    elif variant == "longer":
        new = value + value[: rng.randint(1, max(1, len(value)))] + rng.randbytes(rng.choice([1, 2, 1000]))
    else:
        new = value[:-1]
    tag = TAGS["PixelData"]
    d.put_raw(tag, encode(tag, el.vr or b"OB", new, d.explicit, d.little, length=len(new)))
    return d.to_bytes(), {"encapsulated": False, "variant": variant, "length": len(value), "new": len(new)}


@mutator("dicom", ("dicom",))
def dcm_remove(data, rng, seed):
    d = DicomFile.parse(data)
    names = [n for n in REQUIRED if d.find(n) is not None]
    if rng.random() < 0.1 or not names:
        tag = TAGS["TransferSyntaxUID"]
        el = next((x for x in d.meta_elems() if x.tag == tag), None)
        if el is not None:
            d.set_meta(d.meta[: el.start] + d.meta[el.end :])
            return d.prefix + d.meta + d.raw_body, {"removed": "TransferSyntaxUID"}
    name = rng.choice(names)
    d.remove(name)
    return d.to_bytes(), {"removed": name}
