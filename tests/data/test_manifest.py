import pytest

from medtl.data import read_manifest
from medtl.errors import ManifestError


def test_bad_rows_reported_and_rest_used(tmp_path, caplog):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(
        "image,label,patient_id\na.png,0,P1\nmissing.png,1,P2\n,1,P3\nb.png,1,P4\nb.png,,P5\n")
    m = read_manifest(tmp_path / "m.csv")
    assert [r["patient_id"] for r in m.records] == ["P1", "P4"]
    assert [r["label"] for r in m.records] == [0, 1]
    assert len(m.problems) == 3
    assert "row 3" in str(m.problems[0]) and "missing.png" in str(m.problems[0])
    assert "skipped" in caplog.text


def test_missing_columns_named(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(ManifestError, match="patient_id"):
        read_manifest(tmp_path / "m.csv")


def test_string_labels_sorted_into_classes(tmp_path):
    for n in "abc":
        (tmp_path / f"{n}.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image,label,patient_id\na.png,normal,P1\nb.png,benign,P2\nc.png,normal,P3\n")
    m = read_manifest(tmp_path / "m.csv")
    assert m.class_names == ["benign", "normal"]
    assert "3 images" in repr(m)
