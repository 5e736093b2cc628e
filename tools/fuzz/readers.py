"""The fuzz run's default reader: every kind of input medtl takes from a user, read by the code that takes it.

Images go through :func:`medtl.io.read_image`; a DICOM file also through ``medtl deid`` (into a scratch folder,
its refusal raised as the typed error it records); a configuration through :func:`medtl.config.load_config`; a
MedMNIST ``.npz`` through :func:`medtl.data.sources.read_medmnist`; a manifest through
:func:`medtl.data.manifest.read_manifest` (without looking for its image files, which a mutant's rows do not name).
"""

import tempfile
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
    if suffix == ".csv":
        from medtl.data.manifest import read_manifest

        return read_manifest(p, check_files=False)
    if suffix != ".zip" and _is_dicom(p):
        from medtl.clinical.deid import Deidentifier, deidentify_files

        with tempfile.TemporaryDirectory(prefix="fuzz-deid-") as out:
            result = deidentify_files([p], out, Deidentifier(key=b"fuzz-key-0123456789"))
            if result.errors and not result.errors[0].path:
                raise AssertionError("a deid error names no file")
    return read_image(p)


def _is_dicom(p: Path) -> bool:
    try:
        return sniff_format(p) == "dicom"
    except Exception:
        return False
