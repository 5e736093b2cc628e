"""Mutators of the inputs that are not images (issue 33): configurations (hostile YAML shapes: deep nesting,
alias bombs, huge integers, other top-level types, bytes that are not UTF-8, values of the wrong type),
MedMNIST ``.npz`` files (labels NaN, negative, fractional or huge; images of other ranks; .npy headers that lie
about their shape) and manifests (long, missing or extra fields, huge labels, NUL bytes); and, in the size-lie
family, compressed DICOM whose codestream declares another size than the header (JPEG 2000 SIZ, JPEG SOF) and
.npz members whose .npy header declares a far larger shape."""

import io
import re
import struct
import zipfile

import numpy as np

from tools.fuzz.input_seeds import npz_bytes
from tools.fuzz.registry import mutator


def _yaml_shape(rng) -> tuple[bytes, str]:
    which = rng.choice(["deep_list", "deep_map", "aliases", "huge_int", "top_list", "top_number", "top_string"])
    if which == "deep_list":
        n = rng.choice([100, 1000, 5000])
        return ("data: " + "[" * n + "]" * n + "\n").encode(), f"{which} {n}"
    if which == "deep_map":
        n = rng.choice([100, 1000, 3000])
        return "".join(f"{' ' * i}k{i}:\n" for i in range(n)).encode(), f"{which} {n}"
    if which == "aliases":
        n = rng.choice([5, 10, 20])
        lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, n)]
        return ("\n".join(lines) + "\n").encode(), f"{which} {n}"
    if which == "huge_int":
        return ("train:\n  epochs: " + "9" * rng.choice([50, 4400]) + "\n").encode(), which
    if which == "top_list":
        return b"- data\n- train\n", which
    if which == "top_number":
        return b"42\n", which
    return b"just a sentence\n", which


@mutator("config", ("config",))
def yaml_shape(data, rng, seed):
    """The configuration replaced by a hostile YAML shape, or that shape put after it."""
    shape, which = _yaml_shape(rng)
    return (shape if rng.random() < 0.5 else data + b"\n" + shape), {"shape": which}


@mutator("config", ("config",))
def yaml_value(data, rng, seed):
    """One scalar value of the configuration replaced by a value of another type or a hostile one."""
    values = [b"-1", b"0", b"1e309", b".nan", b"[1, 2]", b"{a: b}", b"null", b"'\xe9t\xe9'", b"\xff\xfe", b"~" * 3]
    spots = [m.span(1) for m in re.finditer(rb":[ ]+([^\n#]+)", data)]
    if not spots:
        return data + b"\n" + rng.choice(values), {"appended": True}
    a, b = rng.choice(spots)
    value = rng.choice(values)
    return data[:a] + value + data[b:], {"at": a, "value": value}


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@mutator("npz", ("npz",))
def npz_labels(data, rng, seed):
    arrays = _arrays(data)
    split = rng.choice(["train", "val", "test"])
    labels = arrays[f"{split}_labels"].astype(np.float64)
    which = rng.choice(["nan", "negative", "fraction", "huge", "empty", "wide"])
    if which == "empty":
        arrays[f"{split}_labels"] = labels[:0]
    elif which == "wide":
        arrays[f"{split}_labels"] = np.zeros((len(labels), rng.choice([2, 3, 5000])), np.uint8)
    else:
        labels[rng.randrange(len(labels))] = {"nan": np.nan, "negative": -3, "fraction": 0.5, "huge": 1e9}[which]
        arrays[f"{split}_labels"] = labels
    return npz_bytes(arrays), {"split": split, "labels": which}


@mutator("npz", ("npz",))
def npz_images(data, rng, seed):
    arrays = _arrays(data)
    split = rng.choice(["train", "val", "test"])
    images = arrays[f"{split}_images"]
    which = rng.choice(["scalar", "flat", "five_d", "empty", "float_nan", "missing"])
    if which == "missing":
        del arrays[f"{split}_images"]
    else:
        arrays[f"{split}_images"] = {
            "scalar": lambda: np.asarray(7, np.uint8),
            "flat": lambda: images.reshape(-1),
            "five_d": lambda: images.reshape(len(images), 1, 1, *images.shape[1:]),
            "empty": lambda: images[:0],
            "float_nan": lambda: np.full(images.shape, np.nan, np.float32),
        }[which]()
    return npz_bytes(arrays), {"split": split, "images": which}


@mutator("sizelie", ("npz",))
def npz_header_lie(data, rng, seed):
    """A member's .npy header declares a far larger shape than its data (the reader must check before it
    allocates: the budget, not the file's size, bounds it)."""
    out = io.BytesIO()
    key = rng.choice(["train_images", "train_labels", "test_images"])
    big = rng.choice(["(100000, 1000, 1000)", "(4000000000,)", "(2, 28, 28)", "(-1, 28)"])
    with zipfile.ZipFile(io.BytesIO(data)) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for info in z.infolist():
            body = z.read(info)
            if info.filename == key + ".npy":
                body = re.sub(rb"'shape': \([^)]*\)", b"'shape': " + big.encode(), body, count=1)
            w.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), body)
    return out.getvalue(), {"member": key, "shape": big}


@mutator("manifest", ("manifest",))
def csv_rows(data, rng, seed):
    lines = data.split(b"\n")
    which = rng.choice(["long_field", "no_header", "extra_columns", "huge_label", "nul", "empty_ids", "quotes"])
    k = rng.randrange(1, max(2, len(lines) - 1))
    if which == "long_field":
        lines[k] = b"x" * rng.choice([1000, 200_000]) + lines[k]
    elif which == "no_header":
        lines = lines[1:]
    elif which == "extra_columns":
        lines[k] += b"," * rng.choice([10, 5000])
    elif which == "huge_label":
        lines = [b"image,label,patient_id"] + [f"img_{i}.dcm,{10**9 + i},p{i}".encode() for i in range(4)]
    elif which == "nul":
        lines[k] = lines[k][:5] + b"\x00" + lines[k][5:]
    elif which == "empty_ids":
        lines[k] = b",,"
    else:
        lines[k] = b'"' + lines[k]
    return b"\n".join(lines), {"rows": which, "line": k}


def _compressed(seed) -> bool:
    return b"\xff\x4f\xff\x51" in seed.data or b"\xff\xd8\xff" in seed.data


@mutator("sizelie", ("dicom",), applies=_compressed)
def codestream_size_lie(data, rng, seed):
    """The compressed frame's own size (JPEG 2000 SIZ Xsiz/Ysiz, or JPEG SOF lines/samples) set far larger
    than the DICOM header's Rows/Columns: a small file whose decoder would allocate the codestream's size."""
    size = rng.choice([4096, 22000, 65535])
    buf = bytearray(data)
    at = buf.find(b"\xff\x4f\xff\x51")
    if at >= 0:
        struct.pack_into(">II", buf, at + 8, size, size)
        return bytes(buf), {"codestream": "j2k", "size": size}
    at = buf.find(b"\xff\xd8\xff")
    i = at + 2
    while 0 <= i < len(buf) - 9:
        marker = buf[i + 1]
        if buf[i] == 0xFF and marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", buf, i + 5, size, size)
            return bytes(buf), {"codestream": "jpeg", "size": size}
        i += 2 + struct.unpack(">H", bytes(buf[i + 2 : i + 4]))[0]
    raise ValueError("no size marker found")
