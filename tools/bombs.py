"""Memory bombs against medtl's readers, each read in a fresh process: seconds, peak memory, outcome.

Each bomb is read in a fresh process, timed, and its peak memory over the process's baseline measured.
Prints a markdown table (as in results/fuzz/bombs.md).

    python -m tools.bombs [--dir /tmp/bombs]     # from the repository root

The bombs (written to --dir, about 400 MB on disk, mostly the 10,000-copy zip):
  deflated_1GiB.dcm      a Deflated Explicit VR DICOM whose zeros inflate to 1 GiB of pixels (1 MB on disk)
  two_3GiB_members.zip   a zip of two members of zeros, 3 GiB each once inflated
  10000_copies.zip       10,000 copies of one CT slice
  level1.nii.gz          a 512 x 512 x 1200 int16 volume of zeros, gzip level 1
  dim3_32767.nii.gz      a small .nii.gz whose header says dim[3] = 32767
  ihdr_100000.png        a PNG whose header declares 100,000 x 100,000 pixels
  valid_12000.png        a valid 12,000 x 12,000 PNG
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import resource, sys, time
from medtl.io import read_image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    outcome = "read " + str(read_image(sys.argv[1]).array.shape)
except Exception as e:
    outcome = type(e).__name__ + ": " + str(e).split(": ", 1)[-1][:110]
seconds = time.perf_counter() - start
print(f"{seconds:.2f}\t{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024:.0f}\t{outcome}")
'''


def _ct_small() -> Path:
    """pydicom's bundled CT_small.dcm."""
    path = get_testdata_file("CT_small.dcm")
    if not isinstance(path, str):
        raise FileNotFoundError("pydicom's test file CT_small.dcm is missing")
    return Path(path)


def write_deflated_bomb(path: Path, rows: int = 16384, cols: int = 16384, frames: int = 2) -> Path:
    """A Deflated Explicit VR LE DICOM (pydicom's CT_small less its pixels) whose zero pixels inflate to
    rows*cols*frames*2 bytes."""
    ds = pydicom.dcmread(_ct_small())
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    del ds.PixelData
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)  # explicit VR little endian body without the pixels
    body = buf.getvalue()
    pixel_len = rows * cols * frames * 2
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_len)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body + element)]
    zeros = bytes(1 << 20)
    for _ in range(pixel_len >> 20):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    mbuf = pydicom.filebase.DicomBytesIO()
    mbuf.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(mbuf, meta, enforce_standard=True)
    path.write_bytes(mbuf.getvalue() + b"".join(parts))
    return path


def _write_zips(out: Path) -> None:
    with zipfile.ZipFile(out / "two_3GiB_members.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("a.dcm", "b.dcm"):
            with z.open(name, "w", force_zip64=True) as f:
                for _ in range(48):
                    f.write(bytes(64 << 20))
    one = _ct_small().read_bytes()
    with zipfile.ZipFile(out / "10000_copies.zip", "w") as z:
        for i in range(10000):
            z.writestr(f"{i}.dcm", one)


def _write_niftis(out: Path) -> None:
    plain = out / "level1.nii"
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 1200), np.int16), np.eye(4)), plain)
    with open(plain, "rb") as f, gzip.open(out / "level1.nii.gz", "wb", compresslevel=1) as g:
        while block := f.read(1 << 24):
            g.write(block)
    plain.unlink()
    lying = out / "dim3_32767.nii.gz"
    volume = np.random.default_rng(0).integers(0, 999, (256, 256, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), lying)
    raw = bytearray(gzip.decompress(lying.read_bytes()))
    raw[46:48] = struct.pack("<h", 32767)  # dim[3]
    lying.write_bytes(gzip.compress(bytes(raw)))


def _write_pngs(out: Path) -> None:
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    header = bytearray(png.getvalue())
    header[16:24] = struct.pack(">II", 100000, 100000)
    header[29:33] = struct.pack(">I", zlib.crc32(bytes(header[12:29])))
    (out / "ihdr_100000.png").write_bytes(bytes(header))
    Image.new("L", (12000, 12000)).save(out / "valid_12000.png")


def write_bombs(out: Path) -> None:
    """Every bomb of the table into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_deflated_bomb(out / "deflated_1GiB.dcm", rows=16384, cols=16384, frames=2)
    _write_zips(out)
    _write_niftis(out)
    _write_pngs(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bombs", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/bombs"))
    args = p.parse_args(argv)
    write_bombs(args.dir)
    print("| bomb | on disk | seconds | peak RSS over baseline (MiB) | outcome |\n|---|---:|---:|---:|---|")
    for path in sorted(args.dir.iterdir()):
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=ROOT, check=False
        )  # (a reader that crashes is a row of the table, not an error here)
        seconds, mib, outcome = (r.stdout.strip().split("\t") + ["", "", r.stderr[-200:]])[:3]
        print(f"| {path.name} | {path.stat().st_size / 2**20:.1f} MiB | {seconds} | {mib} | {outcome} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
