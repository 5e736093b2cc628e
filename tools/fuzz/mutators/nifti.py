"""NIfTI-1 mutators: header fields (dim, pixdim, datatype, bitpix, vox_offset, scaling, qform/sform,
sizeof_hdr, magic), truncation, and broken gzip streams. A .nii.gz is edited decompressed and recompressed."""

import gzip
import struct

from tools.fuzz.formats import gzip_fast, nifti_endian, nifti_raw
from tools.fuzz.mutators.generic import BYTE_MUTATORS
from tools.fuzz.registry import MUTATORS, mutator

NAN, INF = float("nan"), float("inf")
BITPIX = {
    1: 1,
    2: 8,
    4: 16,
    8: 32,
    16: 32,
    32: 64,
    64: 64,
    128: 24,
    256: 8,
    512: 16,
    768: 32,
    1024: 64,
    1280: 64,
    1536: 128,
    1792: 128,
    2048: 256,
    2304: 32,
}


def _gzipped(seed) -> bool:
    return seed.gzipped


def _nifti_edit(data: bytes, seed, edit) -> tuple[bytes, dict]:
    """``edit(header buffer, byte order) -> details`` applied to the (decompressed) file."""
    raw = nifti_raw(data, seed.gzipped)
    buf = bytearray(raw)
    details = edit(buf, nifti_endian(raw))
    return (gzip_fast(bytes(buf)) if seed.gzipped else bytes(buf)), details


@mutator("nifti", ("nifti",))
def nii_dim(data, rng, seed):
    def edit(buf, e):
        if rng.random() < 0.4:
            value = rng.choice([0, 8, -1, 15, 255])
            struct.pack_into(e + "h", buf, 40, value)
            return {"dim[0]": value}
        i, value = rng.randint(1, 7), rng.choice([0, -1, 32767, -32768, 2])
        struct.pack_into(e + "h", buf, 40 + 2 * i, value)
        return {f"dim[{i}]": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_pixdim(data, rng, seed):
    def edit(buf, e):
        i, value = rng.randint(0, 7), rng.choice([0.0, -1.0, NAN, INF, -INF, 1e38, 1e-38])
        struct.pack_into(e + "f", buf, 76 + 4 * i, value)
        return {f"pixdim[{i}]": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_datatype(data, rng, seed):
    def edit(buf, e):
        code = rng.choice([0, 2048, 9999, -1, 1, 32, 128, 1536, 2304, 1792, 255])
        matched = rng.random() < 0.5
        struct.pack_into(e + "h", buf, 70, code)
        if matched and code in BITPIX:
            struct.pack_into(e + "h", buf, 72, BITPIX[code])
        return {"datatype": code, "bitpix_matched": matched and code in BITPIX}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_bitpix(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([0, 1, 7, 13, 128, -8, 32767])
        struct.pack_into(e + "h", buf, 72, value)
        return {"bitpix": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_vox_offset(data, rng, seed):
    def edit(buf, e):
        value = rng.choice(
            [0.0, 348.0, 351.0, float(len(buf) + rng.randint(1, 1 << 20)), 1e20, -352.0, NAN, INF, 352.5]
        )
        struct.pack_into(e + "f", buf, 108, value)
        return {"vox_offset": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_scaling(data, rng, seed):
    def edit(buf, e):
        field, value = rng.choice(["scl_slope", "scl_inter", "both"]), rng.choice([NAN, INF, -INF, 0.0, 1e38, -1e-38])
        for name in ["scl_slope", "scl_inter"] if field == "both" else [field]:
            struct.pack_into(e + "f", buf, 112 if name == "scl_slope" else 116, value)
        return {"field": field, "value": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_qsform(data, rng, seed):
    def edit(buf, e):
        variant = rng.choice(["qform_code", "sform_code", "quatern", "qoffset", "srow", "sform_zero"])
        if variant in ("qform_code", "sform_code"):
            value = rng.choice([-1, 5, 32767, 0, 1])
            struct.pack_into(e + "h", buf, 252 if variant == "qform_code" else 254, value)
            return {variant: value}
        if variant == "sform_zero":  # a valid sform code with a singular matrix
            struct.pack_into(e + "h", buf, 254, 1)
            struct.pack_into(e + "12f", buf, 280, *([0.0] * 12))
            return {"sform_code": 1, "srow": "zeros"}
        offset = {
            "quatern": 256 + 4 * rng.randrange(3),
            "qoffset": 268 + 4 * rng.randrange(3),
            "srow": 280 + 4 * rng.randrange(12),
        }[variant]
        value = rng.choice([NAN, INF, 2.0, -5.0, 1e38])
        struct.pack_into(e + "f", buf, offset, value)
        if rng.random() < 0.5:
            struct.pack_into(e + "hh", buf, 252, 1, 1 if variant == "srow" else 0)
        return {"field": variant, "offset": offset, "value": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_sizeof_hdr(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([0, 347, 540, 1 << 24, -348, 349])
        struct.pack_into(e + "i", buf, 0, value)
        return {"sizeof_hdr": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_magic(data, rng, seed):
    def edit(buf, e):
        value = rng.choice([b"n+2\0", b"ni1\0", b"\0\0\0\0", b"n+1\r", b"ni2\0", b"abcd"])
        buf[344:348] = value
        return {"magic": value}

    return _nifti_edit(data, seed, edit)


@mutator("nifti", ("nifti",))
def nii_truncate(data, rng, seed):
    """Cut the (decompressed) file inside its header or its voxels; a .nii.gz is then a valid, short gzip."""
    raw = nifti_raw(data, seed.gzipped)
    at = rng.choice([rng.randrange(0, 348), rng.randrange(348, len(raw))])
    return (gzip_fast(raw[:at]) if seed.gzipped else raw[:at]), {"at": at, "of": len(raw)}


@mutator("nifti", ("nifti",), applies=_gzipped)
def nii_inner_bytes(data, rng, seed):
    """A generic byte mutation of the decompressed file, recompressed."""
    name = rng.choice(BYTE_MUTATORS)
    raw, details = MUTATORS[name].fn(gzip.decompress(data), rng, seed)
    return gzip_fast(raw), {"inner": name, **details}


@mutator("nifti", ("nifti",), applies=_gzipped)
def nii_gzip_stream(data, rng, seed):
    variant = rng.choice(
        ["flip_stream", "bad_crc", "bad_size", "cut_stream", "second_member", "bad_flags", "bad_method"]
    )
    buf = bytearray(data)
    if variant == "flip_stream":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(10, len(buf) - 8)] ^= 1 << rng.randrange(8)
    elif variant == "bad_crc":
        buf[-8] ^= 0xFF
    elif variant == "bad_size":
        struct.pack_into("<I", buf, len(buf) - 4, rng.choice([0, 0xFFFFFFFF, 1 << 30]))
    elif variant == "cut_stream":
        buf = buf[: rng.randrange(10, len(buf) - 8)]
    elif variant == "second_member":
        buf += gzip.compress(rng.randbytes(rng.choice([1, 100, 5000])), 1, mtime=0)
    elif variant == "bad_flags":  # FEXTRA with a length running past the data
        buf[3] = 0x04
        buf[10:10] = struct.pack("<H", 0xFFFF)
    else:
        buf[2] = rng.choice([0, 7, 9])
    return bytes(buf), {"variant": variant}
