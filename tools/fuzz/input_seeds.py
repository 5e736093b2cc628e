"""Seeds of the inputs that are not images (issue 33): experiment configurations (the repository's own
``configs/*.yaml``), a MedMNIST-layout ``.npz``, a manifest ``.csv`` and a study's folder tree; and compressed
DICOM (JPEG 2000 and JPEG baseline), whose codestreams the size-lie mutators edit. The same bytes every run
(fixed zip times)."""

import io
import zipfile

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from tools.fuzz.seeds import ROOT, Seed, name_suffix

MEDMNIST_KEYS = [f"{s}_{t}" for s in ("train", "val", "test") for t in ("images", "labels")]


def _seed(name: str, kind: str, data: bytes) -> Seed:
    return Seed(f"gen:{name}", kind, name_suffix(name), data)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` of ``arrays`` with fixed member times (``np.savez`` stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def _medmnist(rng: np.random.Generator) -> bytes:
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    return npz_bytes(arrays)


def _manifest() -> bytes:
    rows = ["image,label,patient_id,split"]
    rows += [f"img_{i:04d}.dcm,{'lesion' if i % 2 else 'no lesion'},p{i // 2:03d},train" for i in range(12)]
    return ("\n".join(rows) + "\n").encode()


def _compressed_dicoms(base: bytes) -> list[Seed]:
    """A CT slice as JPEG 2000 lossless and an 8-bit grey picture as JPEG baseline."""
    ds = pydicom.dcmread(io.BytesIO(base))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pixels = (ds.pixel_array.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16)
    ds.RescaleIntercept = -1024
    ds.compress(JPEG2000Lossless, pixels, generate_instance_uid=False)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    seeds = [_seed("ct_j2k.dcm", "dicom", out.getvalue())]
    ds = pydicom.dcmread(io.BytesIO(base))
    picture = io.BytesIO()
    Image.fromarray(((np.add.outer(np.arange(32), np.arange(32)) * 4) % 256).astype(np.uint8)).save(
        picture, format="JPEG", quality=90
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = encapsulate([picture.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return [*seeds, _seed("grey_jpeg.dcm", "dicom", out.getvalue())]


def _folder(series: list[tuple[str, bytes]]) -> bytes:
    """A study's folder tree (as a zip of its members, the ``.tree`` the fuzz reader unpacks): a series in
    ``study/series-1/``, one of its files deeper down, and a note."""
    from tools.fuzz.formats import zip_bytes

    members = [(f"study/series-1/{'a/b/c/' if k == 0 else ''}{name}", data) for k, (name, data) in enumerate(series)]
    members += [("study/notes.txt", b"hello\n")]
    return zip_bytes(members)


def input_seeds(ct_slice: bytes, series: list[tuple[str, bytes]]) -> list[Seed]:
    """The configuration, ``.npz``, manifest, folder-tree and compressed DICOM seeds (``ct_slice``: a generated
    CT slice; ``series``: the (name, bytes) of a generated series' files)."""
    configs = [_seed(f"config_{p.name}", "config", p.read_bytes()) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    return [
        *configs,
        _seed("medmnist.npz", "npz", _medmnist(np.random.default_rng(7))),
        _seed("manifest.csv", "manifest", _manifest()),
        _seed("study.tree", "folder", _folder(series)),
        *_compressed_dicoms(ct_slice),
    ]
