"""Zip mutators (the "zip" family, on zips of DICOM series): a member mutated as DICOM, thousands of tiny
members, huge declared sizes, deep directories, '../' and absolute names, duplicates, non-DICOM members."""

import struct
import zlib
from pathlib import Path

from tools.fuzz.formats import png_chunk, zip_bytes, zip_entries, zip_members
from tools.fuzz.mutators.generic import BYTE_MUTATORS
from tools.fuzz.registry import MUTATORS, mutator
from tools.fuzz.seeds import Seed, name_suffix


def _files(data: bytes) -> list[tuple[str, bytes]]:
    """The zip's members less its directory entries."""
    return [m for m in zip_members(data) if not m[0].endswith("/")]


@mutator("zip", ("zip", "folder"))
def zip_member(data, rng, seed):
    """One member mutated as a DICOM file (or by a generic byte mutator), the zip rebuilt."""
    members = _files(data)
    dicom = [i for i, (_, body) in enumerate(members) if body[128:132] == b"DICM"]  # (a tree also holds a note)
    k = rng.choice(dicom) if dicom else rng.randrange(len(members))
    name, body = members[k]
    families = (
        [m for m in MUTATORS.values() if m.family == "dicom"]
        if rng.random() < 0.75
        else [MUTATORS[n] for n in BYTE_MUTATORS]
    )
    inner = rng.choice(families)
    member_seed = Seed(f"{seed.id}!{name}", "dicom", name_suffix(name), body)
    new, details = inner.fn(body, rng, member_seed)
    members[k] = (name, new)
    return zip_bytes(members), {"member": name, "inner": inner.name, **{f"inner_{a}": b for a, b in details.items()}}


@mutator("zip", ("zip", "folder"))
def zip_many_members(data, rng, seed):
    """Two of the series' files and thousands of tiny members."""
    count = rng.choice([20000, 6000])
    members = list(zip_members(data)[:2])
    members += [(f"tiny/{i // 1000:02d}/IM{i:05d}.dcm", b"\0" * (i % 17)) for i in range(count)]
    return zip_entries([(name, 0, body, zlib.crc32(body), len(body)) for name, body in members]), {"members": count}


@mutator("zip", ("zip", "folder"))
def zip_huge_declared(data, rng, seed):
    """A member's sizes in the central directory (and its local header) rewritten."""
    buf = bytearray(data)
    eocd = data.rfind(b"PK\x05\x06")
    count, _, cd = struct.unpack_from("<HII", data, eocd + 10)
    entries, pos = [], cd
    for _ in range(count):
        entries.append(pos)
        n, x, c = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + n + x + c
    pos = rng.choice(entries)
    local = struct.unpack_from("<I", data, pos + 42)[0]
    field = rng.choice(["uncompressed", "uncompressed", "compressed"])
    value = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 3 << 30, 0xFFFFFFFF])
    offset = 24 if field == "uncompressed" else 20
    struct.pack_into("<I", buf, pos + offset, value)
    if rng.random() < 0.5:
        struct.pack_into("<I", buf, local + offset - 2, value)
    return bytes(buf), {"field": field, "value": value, "entry": entries.index(pos)}


@mutator("zip", ("zip", "folder"))
def zip_nested_dirs(data, rng, seed):
    depth = rng.choice([2, 10, 50, 200])
    prefix = "/".join(f"d{k}" for k in range(depth)) + "/"
    members = [(prefix + Path(name).name, body) for name, body in _files(data)]
    dirs = ["/".join(f"d{k}" for k in range(i + 1)) + "/" for i in range(depth)] if rng.random() < 0.5 else []
    return zip_bytes([(d, b"") for d in dirs] + members), {"depth": depth, "dir_entries": bool(dirs)}


@mutator("zip", ("zip", "folder"))
def zip_bad_names(data, rng, seed):
    members = _files(data)
    forms = [
        "../{}",
        "../../../tmp/{}",
        "/{}",
        "C:\\{}",
        "a/../../{}",
        "./{}",
        "..\\{}",
        "{}\x00.txt",
        "{}/",
        "a//b///{}",
        " {}",
        "{}" + "x" * 300,
    ]
    renamed = {}
    for k in sorted(rng.sample(range(len(members)), rng.randint(1, len(members)))):
        form = rng.choice(forms)
        name = form.format(Path(members[k][0]).name)
        renamed[members[k][0]] = name
        members[k] = (name, members[k][1])
    return zip_bytes(members), {"renamed": renamed}


@mutator("zip", ("zip", "folder"))
def zip_duplicates(data, rng, seed):
    members = _files(data)
    k = rng.randrange(len(members))
    same_name = rng.random() < 0.5
    copy = (members[k][0] if same_name else members[k][0] + "_copy", members[k][1])
    members.insert(rng.randint(0, len(members)), copy)
    return zip_bytes(members), {"member": members[k][0], "same_name": same_name}


@mutator("zip", ("zip", "folder"))
def zip_foreign_members(data, rng, seed):
    members = _files(data)
    extras = {
        "notes.txt": b"not an image\n",
        "empty.dcm": b"",
        "DICOMDIR": rng.randbytes(200),
        "__MACOSX/._IM0001": rng.randbytes(64),
        ".hidden.dcm": members[0][1],
        "inner.zip": data,
        "image.png": png_chunk(b"IEND", b""),
        "huge_name" + "y" * 1000: b"x",
    }
    chosen = sorted(rng.sample(sorted(extras), rng.randint(1, 4)))
    if rng.random() < 0.3:  # only foreign members: no DICOM left
        members = []
    return zip_bytes(members + [(n, extras[n]) for n in chosen]), {"added": chosen, "dicom_kept": bool(members)}
