"""The fuzz run's default reader: every kind of input medtl takes from a user, read by the code that takes it.

Images go through :func:`medtl.io.read_image`; a DICOM file also through ``medtl deid`` (into a scratch folder,
its refusal raised as the typed error it records); a configuration through :func:`medtl.config.load_config`; a
MedMNIST ``.npz`` through :func:`medtl.data.sources.read_medmnist`; a manifest through
:func:`medtl.data.manifest.read_manifest` (without looking for its image files, which a mutant's rows do not name);
a folder tree (``.tree``: a zip of its members, unpacked here within limits) through ``read_image`` on the folder,
``medtl deid`` on its files and ``predict --recursive``'s search (:func:`medtl.predict.batch.find_inputs`).
"""

import tempfile
import zipfile
import zlib
from pathlib import Path

from medtl.io.reader import read_image, sniff_format


def read_input(path: str):
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        from medtl.config import load_config

        return load_config(p)
    if suffix == ".npz":
        from medtl.data.sources import read_medmnist

        return read_medmnist(p)
    if suffix == ".tree":
        return _read_tree(p)
    if suffix == ".csv":
        from medtl.data.manifest import read_manifest

        return read_manifest(p, check_files=False)
    if suffix != ".zip" and _is_dicom(p):
        _deidentify([p])
    return read_image(p)


def _deidentify(files) -> None:
    from medtl.clinical.deid import Deidentifier, deidentify_files

    with tempfile.TemporaryDirectory(prefix="fuzz-deid-") as out:
        result = deidentify_files(files, out, Deidentifier(key=b"fuzz-key-0123456789"))
        if any(not e.path for e in result.errors):
            raise AssertionError("a deid error names no file")


MEMBER_BYTES, TREE_BYTES, TREE_FILES = 64 << 20, 256 << 20, 5000  # what the fuzz unpacks of one tree


def _unpack(path: Path, into: Path) -> None:
    """The tree's members written under ``into``: names that would leave it, over-large or surplus members and
    paths the file system refuses (too long) are skipped; folders made one level at a time (os.makedirs
    recurses)."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist()[:TREE_FILES]:
            parts = [x for x in info.filename.replace("\\", "/").split("/") if x not in ("", ".")]
            too_large = max(info.file_size, info.compress_size) > MEMBER_BYTES
            if not parts or ".." in parts or info.filename.startswith("/") or too_large:
                continue
            total += info.file_size
            if total > TREE_BYTES:
                break
            try:
                folder = into
                for name in parts[:-1] if not info.is_dir() else parts:
                    folder = folder / name
                    if not folder.is_dir():
                        folder.mkdir()
                if not info.is_dir():
                    (folder / parts[-1]).write_bytes(z.read(info)[:MEMBER_BYTES])
            except (OSError, zipfile.BadZipFile, RuntimeError, EOFError, zlib.error, NotImplementedError, MemoryError):
                continue


def _read_tree(path: Path):
    from medtl.clinical.deid import dicom_files
    from medtl.predict.batch import find_inputs

    try:
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None  # the container itself is broken: no tree to read (its readers never see one)
    with tempfile.TemporaryDirectory(prefix="fuzz-tree-") as root:
        folder = Path(root) / "tree"
        folder.mkdir()
        _unpack(path, folder)
        with find_inputs([folder], recursive=True) as inputs:
            list(inputs)
        _deidentify(dicom_files([folder]))
        return read_image(folder)


def _is_dicom(p: Path) -> bool:
    try:
        return sniff_format(p) == "dicom"
    except Exception:
        return False
