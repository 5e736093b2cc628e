import numpy as np
import pytest

from medtl.data import split_by_patient
from medtl.errors import MedtlInputError


def test_no_patient_in_two_parts_and_all_classes_present():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i}" for i in range(40)], rng.integers(1, 4, size=40))
    labels = np.array([int(p[1:]) % 2 for p in patients])
    parts = split_by_patient(labels, patients, 0.2, 0.2, seed=3)
    sets = {k: set(patients[v]) for k, v in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sorted(np.concatenate(list(parts.values()))) == list(range(len(labels)))
    for v in parts.values():
        assert set(labels[v]) == {0, 1}
    assert 0.1 < len(sets["test"]) / 40 < 0.3


def test_split_is_deterministic_for_a_seed():
    patients = [f"P{i // 2}" for i in range(60)]
    labels = [(i // 2) % 2 for i in range(60)]
    a = split_by_patient(labels, patients, seed=1)
    b = split_by_patient(labels, patients, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_too_few_patients_refused():
    with pytest.raises(MedtlInputError, match="patients"):
        split_by_patient([0, 1, 0], ["a", "b", "c"])
