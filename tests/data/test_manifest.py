import pytest

from medtl.data import read_manifest
from medtl.errors import ManifestError


def test_bad_rows_reported_and_rest_used(tmp_path, caplog):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(
        "image,label,patient_id\na.png,0,P1\nmissing.png,1,P2\n,1,P3\nb.png,1,P4\nb.png,,P5\n"
    )
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


def test_ill_formed_and_missing_labels_skipped_with_their_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    labels = ["0", "1", "0", "1", "1.0", "", "x", "-1", "nan", "2.5", "yes", "NA"]
    rows = "".join(f"a.png,{lab},P{i}\n" for i, lab in enumerate(labels))
    (tmp_path / "m.csv").write_text("image,label,patient_id\n" + rows)
    m = read_manifest(tmp_path / "m.csv")
    assert m.class_names == ["0", "1"] and [r["label"] for r in m.records] == [0, 1, 0, 1, 1]
    reasons = {p.where: p.reason for p in m.problems}
    assert len(reasons) == 7
    assert "missing" in reasons["m.csv row 7"] and "missing" in reasons["m.csv row 10"]  # '' and nan
    for row in (8, 9, 11, 12):  # x, -1, 2.5, yes
        assert "not a class index" in reasons[f"m.csv row {row}"]


def test_classes_from_the_config_fix_the_order_and_refuse_others(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image,label,patient_id\na.png,normal,P1\na.png,tumour,P2\na.png,tumor,P3\n")
    m = read_manifest(tmp_path / "m.csv", classes=("tumour", "normal"))
    assert m.class_names == ["tumour", "normal"] and [r["label"] for r in m.records] == [1, 0]
    assert "not one of data.classes" in str(m.problems[0])
    from medtl.config import load_config

    assert load_config(data={"classes": ["tumour", "normal"]}).data.classes == ("tumour", "normal")


def test_paths_outside_the_manifest_folder_refused_unless_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (data / "m.csv").write_text(
        f"image,label,patient_id\na.png,0,P1\n../secret.png,1,P2\n{secret},1,P3\nsub/../a.png,1,P4\n"
    )
    m = read_manifest(data / "m.csv")
    assert [r["patient_id"] for r in m.records] == ["P1", "P4"]
    assert all("leads out of the manifest's folder" in p.reason for p in m.problems) and len(m.problems) == 2
    assert "../secret.png" in m.problems[0].reason
    allowed = read_manifest(data / "m.csv", allow_outside_paths=True)
    assert [r["patient_id"] for r in allowed.records] == ["P1", "P2", "P3", "P4"]
    assert {r["image"] for r in allowed.records} >= {str(secret)}


def test_a_classes_map_names_the_classes_and_refuses_two_labels_with_one_name(tmp_path):
    import pytest

    from medtl.data.manifest import index_labels
    from medtl.errors import ManifestError

    records = [{"label_value": "0"}, {"label_value": "1"}, {"label_value": "1"}]
    good, names = index_labels([dict(r) for r in records], [], {"0": "no lesion", "1": "lesion"})
    assert names == ["no lesion", "lesion"] and [r["label"] for r in good] == [0, 1, 1]
    with pytest.raises(ManifestError, match="two labels one name"):
        index_labels([dict(r) for r in records], [], {"0": "x", "1": "x"})
