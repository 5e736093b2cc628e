"""Labelled data sets from a manifest CSV, an image folder or a MedMNIST ``.npz``.

``read_dataset(path)`` recognises the kind and returns a :class:`Manifest` either way, so the
rest of medtl does not care where the labels came from.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from medtl.data.manifest import Manifest, Problem, index_labels, inside, read_manifest
from medtl.errors import FileMissingError, InputTooLargeError, ManifestError, UnsupportedFormatError
from medtl.io.limits import read_limits
from medtl.io.walk import walk_files

log = logging.getLogger("medtl.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz")
MEDMNIST_KEYS = tuple(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))


def read_dataset(
    path: str | Path,
    classes: tuple[str, ...] | dict[str, str] | None = None,
    allow_outside_paths: bool = False,
    label_columns: tuple[str, ...] | None = None,
) -> Manifest:
    """Read a labelled data set: a manifest ``.csv``, a MedMNIST ``.npz`` or an image folder.

    An image folder holds one sub-folder per class (``root/<class>/<image>``); every image
    is then its own patient (say so with a manifest when patients have several images).
    ``classes`` (``data.classes``) lists the accepted labels in class order (a manifest's or a
    folder's), or maps them to class names; MedMNIST files are named from its label table.
    ``allow_outside_paths`` lets a manifest name images outside its folder; ``label_columns``
    (``data.label_columns``) names a multi-label manifest's 0/1 columns, one per finding.
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError(path, "data not found", "a manifest .csv, an image folder or a MedMNIST .npz")
    if path.is_dir():
        return read_image_folder(path, classes)
    if path.suffix.lower() == ".npz":
        return read_medmnist(path, classes)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return read_manifest(
            path, classes=classes, allow_outside_paths=allow_outside_paths, label_columns=label_columns
        )
    raise UnsupportedFormatError(
        path, f"unrecognised data set file {path.name!r}", "a manifest .csv, an image folder or a MedMNIST .npz"
    )


def read_image_folder(root: str | Path, classes: tuple[str, ...] | None = None) -> Manifest:
    """One sub-folder per class; files that are not images are reported and skipped."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ManifestError(
            root,
            f"image folder has {len(classes)} class sub-folder(s)",
            "one sub-folder per class (at least 2), each holding images",
        )
    records, problems = [], []
    for name in classes:
        for f in sorted(walk_files(root / name, lambda n: not n.startswith("."))):
            if not f.name.lower().endswith(IMAGE_SUFFIXES):
                problems.append(Problem(str(f.relative_to(root)), "not an image file (by suffix)"))
                continue
            rel = f.relative_to(root)
            records.append({"image": str(f), "label_value": name, "patient_id": rel.with_suffix("").as_posix()})
    if not records:
        raise ManifestError(root, "no image files in the class folders")
    records, class_names = index_labels(records, problems, classes)
    if not records:
        raise ManifestError(root, f"no usable images ({len(problems)} skipped)")
    log.info("%s: image folder without patient ids; each image is treated as its own patient", root.name)
    return Manifest(path=root, records=records, class_names=class_names, problems=problems, kind="folder")


# What MedMNIST's labels mean (the ``label`` field of the medmnist package's INFO table), by file name
MEDMNIST_LABELS = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "nodulemnist3d": ["benign", "malignant"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "chestmnist": [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
}


# The finding of each two-class MedMNIST set: the class a positive answer means (BreastMNIST lists it first)
MEDMNIST_POSITIVE = {
    "breastmnist": "malignant",
    "pneumoniamnist": "pneumonia",
    "adrenalmnist3d": "hyperplasia",
    "nodulemnist3d": "malignant",
    "vesselmnist3d": "aneurysm",
}


MAX_CLASSES = 1000  # a label above this is a damaged file, not a class (it would name a billion classes)


def _checked_labels(path: Path, split: str, labels: np.ndarray, multi: bool, train_shape: tuple) -> np.ndarray:
    """A split's labels as integers, or a :class:`ManifestError` naming the split: multi-label 0/1 columns like
    the training split's; single-label whole numbers from 0 to :data:`MAX_CLASSES` - 1 (NaN, fractions and
    negatives refused)."""
    if multi:
        if labels.ndim != 2 or labels.shape[1] != train_shape[1] or not np.isin(labels, (0, 1)).all():
            raise ManifestError(
                path,
                f"{split}: multi-label labels of shape {labels.shape}, not 0/1 columns like the training "
                f"split's {train_shape[1]}",
            )
        return labels.astype(np.int64)
    flat = labels.reshape(-1)
    if flat.dtype.kind not in "iub" and not (flat.dtype.kind == "f" and np.isfinite(flat).all()):
        raise ManifestError(path, f"{split}: labels of type {flat.dtype} (NaN or not numbers)", "whole numbers")
    if flat.size and (np.any(flat != np.round(flat)) or flat.min() < 0 or flat.max() >= MAX_CLASSES):
        raise ManifestError(
            path,
            f"{split}: labels from {flat.min()} to {flat.max()}",
            f"whole numbers from 0 to {MAX_CLASSES - 1} (one per class)",
        )
    return flat.astype(np.int64)


def _medmnist_set(path: Path) -> str:
    """The MedMNIST set a file is of, by its name: ``breastmnist_128.npz`` -> ``breastmnist``."""
    return path.name.split(".")[0].split("_")[0].lower()


def medmnist_class_names(path: Path, n_classes: int) -> list[str]:
    """The classes' names of a MedMNIST file (``breastmnist_128.npz`` -> breastmnist's), or the indices."""
    names = MEDMNIST_LABELS.get(_medmnist_set(path))
    return list(names) if names and len(names) == n_classes else [str(c) for c in range(n_classes)]


def _declared_bytes(npz) -> int:
    """The bytes the MedMNIST arrays of an opened ``.npz`` declare in their .npy headers (shape and type)."""
    total = 0
    for key in MEDMNIST_KEYS:
        with npz.zip.open(key + ".npy") as f:
            npy = np.lib.format
            version = npy.read_magic(f)
            shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    return total


def read_medmnist(path: str | Path, classes: dict[str, str] | None = None) -> Manifest:
    """A MedMNIST ``.npz`` (2D or 3D) with its own train/val/test split, held in memory.

    Images keep their uint8 values (scaled by the type's range). A multi-label file (ChestMNIST: a 0/1
    column per finding) gives multi-label records.
    """
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
        missing = [k for k in MEDMNIST_KEYS if k not in npz.files]
        if missing:
            raise UnsupportedFormatError(
                path, f"not a MedMNIST file: missing {', '.join(missing)}", "keys " + ", ".join(MEDMNIST_KEYS)
            )
        read_limits().check(path, _declared_bytes(npz), "the .npz's arrays")  # before any is decompressed
        arrays = {k: npz[k] for k in MEDMNIST_KEYS}
    except (UnsupportedFormatError, FileMissingError, InputTooLargeError):
        raise
    except Exception as e:
        raise UnsupportedFormatError(path, f"cannot be read as .npz ({type(e).__name__}: {str(e)[:120]})") from None
    records, splits = [], {}
    multi = arrays["train_labels"].ndim == 2 and arrays["train_labels"].shape[1] > 1
    for split in ("train", "val", "test"):
        images = arrays[f"{split}_images"]
        labels = _checked_labels(path, split, arrays[f"{split}_labels"], multi, arrays["train_labels"].shape)
        if images.ndim not in (3, 4) or len(images) == 0:
            raise ManifestError(
                path, f"{split}: images of shape {images.shape}", "(N, H, W), (N, H, W, C) or (N, D, H, W), N >= 1"
            )
        if len(images) != len(labels):
            raise ManifestError(path, f"{split}: {len(images)} images but {len(labels)} labels")
        start = len(records)
        for i, (image, label) in enumerate(zip(images, labels)):
            records.append(
                {
                    "image": image,
                    "label": tuple(int(v) for v in label) if multi else int(label),
                    "patient_id": f"{split}-{i}",
                    "path": f"{path.name}:{split}/{i}",
                }
            )
        splits[split] = list(range(start, len(records)))
    n_classes = arrays["train_labels"].shape[1] if multi else int(max(r["label"] for r in records)) + 1
    names = medmnist_class_names(path, n_classes)
    if isinstance(classes, dict):  # data.classes {index: name} names them
        names = [classes.get(str(c), names[c]) for c in range(n_classes)]
    positive = MEDMNIST_POSITIVE.get(_medmnist_set(path))
    positive = positive if positive in names else None
    return Manifest(path, records, names, splits=splits, kind="medmnist", multi_label=multi, positive=positive)


def read_unlabelled(path: str | Path, allow_outside_paths: bool = False) -> list[dict]:
    """Images without labels, for semi-supervised training (``data.unlabelled``): every image file under a
    folder (by suffix, recursively), the images of a manifest (any labels are ignored; ``image`` and
    ``patient_id`` are read), or a MedMNIST file's training images. Records carry a placeholder label 0.

    Raises:
        FileMissingError: nothing at ``path``.
        ManifestError: no image found.
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError(path, "unlabelled data not found", "an image folder, a manifest .csv or a MedMNIST .npz")
    if path.is_dir():
        files = sorted(walk_files(path, lambda n: not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)))
        records = [
            {"image": str(f), "label": 0, "patient_id": f.relative_to(path).with_suffix("").as_posix()} for f in files
        ]
    elif path.suffix.lower() == ".npz":
        m = read_medmnist(path)
        records = [{**m.records[i], "label": 0} for i in m.splits["train"]]
    else:
        root = Path(path).parent.absolute()
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if rows and "image" not in rows[0]:
            raise ManifestError(path, "no image column", "a manifest with an image column")
        records = []
        for i, row in enumerate(rows, start=2):
            image = inside(root, row["image"]) or (Path(row["image"]) if allow_outside_paths else None)
            if image is None or not image.is_file():
                log.warning("skipped %s row %d: image missing or outside the manifest's folder", path.name, i)
                continue
            records.append({"image": str(image), "label": 0, "patient_id": row.get("patient_id") or str(image)})
    if not records:
        raise ManifestError(path, "no unlabelled image found", "image files (" + ", ".join(IMAGE_SUFFIXES) + ")")
    return records
