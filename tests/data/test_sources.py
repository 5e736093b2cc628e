"""Data sets from image folders and MedMNIST files; k-fold and split checks."""

import numpy as np
import pytest
from PIL import Image

from medtl.data import check_split_classes, kfold_by_patient, read_dataset
from medtl.errors import ManifestError, MedtlInputError, UnsupportedFormatError


def write_medmnist(path, shape=(16, 16), n=(20, 6, 8), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        labels = np.arange(k) % 2
        images = rng.integers(0, 100, size=(k, *shape)).astype(np.uint8)
        images[labels == 1] += 100  # class 1 brighter
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_keeps_its_split_2d_and_3d(tmp_path):
    m = read_dataset(write_medmnist(tmp_path / "b.npz"))
    assert m.kind == "medmnist" and {k: len(v) for k, v in m.splits.items()} == {"train": 20, "val": 6, "test": 8}
    assert m.records[0]["image"].dtype == np.uint8 and m.class_names == ["0", "1"]
    m3 = read_dataset(write_medmnist(tmp_path / "v.npz", shape=(8, 8, 8)))
    assert m3.records[0]["image"].shape == (8, 8, 8)


def test_not_medmnist_npz_refused(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(UnsupportedFormatError, match="x.npz.*missing"):
        read_dataset(tmp_path / "x.npz")


def test_image_folder_one_subfolder_per_class(tmp_path):
    for cls, value in (("benign", 20), ("malignant", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "benign" / "readme.txt").write_text("x")
    m = read_dataset(tmp_path)
    assert m.kind == "folder" and m.class_names == ["benign", "malignant"] and len(m.records) == 6
    assert len(m.problems) == 1 and "readme.txt" in m.problems[0].where
    (tmp_path / "malignant").rename(tmp_path / ".hidden")
    with pytest.raises(ManifestError, match="1 class sub-folder"):
        read_dataset(tmp_path)


def test_kfold_tests_every_patient_once():
    labels = np.array([0, 1] * 20)
    patients = np.repeat([f"p{i}" for i in range(20)], 2)
    labels = np.array([i % 2 for i in range(20)]).repeat(2)
    folds = kfold_by_patient(labels, patients, k=4)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(40))
    for train, test in folds:
        assert not set(patients[train]) & set(patients[test])
    with pytest.raises(MedtlInputError, match="too few"):
        kfold_by_patient(labels[:6], patients[:6], k=4)


def test_a_split_with_a_single_example_of_a_class_is_refused():
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    with pytest.raises(MedtlInputError, match="fewer than 2"):
        check_split_classes(labels, {"train": np.arange(5), "val": np.array([5, 6])}, 2)


def test_a_medmnist_file_names_its_clinical_finding_and_positive_class_is_checked(tmp_path):
    """BreastMNIST's first class is its finding (malignant): the finding is named, not taken from class 1."""
    from medtl.config import DataConfig
    from medtl.data.manifest import positive_class
    from medtl.errors import ConfigError

    breast = read_dataset(write_medmnist(tmp_path / "breastmnist_64.npz"))
    assert breast.class_names == ["malignant", "normal, benign"] and breast.positive == "malignant"
    assert positive_class(DataConfig(), breast) == "malignant"
    assert positive_class(DataConfig(positive_class="normal, benign"), breast) == "normal, benign"
    assert positive_class(DataConfig(positive_class="1"), breast) == "normal, benign"  # (an index, as YAML may)
    other = read_dataset(write_medmnist(tmp_path / "b.npz"))
    assert other.positive is None and positive_class(DataConfig(), other) is None  # the second class
    with pytest.raises(ConfigError, match="'tumour' is not one of the classes"):
        positive_class(DataConfig(positive_class="tumour"), breast)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"train_labels": np.array([[np.nan]] * 20)}, "train: labels of type float64"),
        ({"train_labels": np.array([[10**9]] + [[0]] * 19)}, "train: labels from 0 to 1000000000"),
        ({"val_labels": np.array([[-3]] + [[0]] * 5)}, "val: labels from -3 to 0"),
        ({"test_labels": np.array([[0.5]] + [[1]] * 7)}, "test: labels from 0.5 to 1.0"),
        ({"val_images": np.zeros((0, 16, 16), np.uint8), "val_labels": np.zeros((0, 1))}, "val: images of shape"),
        ({"train_images": np.zeros((20,), np.uint8)}, r"train: images of shape \(20,\)"),
    ],
)
def test_a_damaged_medmnist_file_is_a_typed_error_naming_the_split(tmp_path, change, said):
    """NaN labels, a label of 10^9 (a billion class names: out of memory), negative or fractional labels, an empty
    split and 0-d images were untyped errors or silently wrong before."""
    path = write_medmnist(tmp_path / "b.npz")
    arrays = dict(np.load(path))
    arrays.update(change)
    np.savez(path, **arrays)
    with pytest.raises(ManifestError, match=said):
        read_dataset(path)
