"""The page's logic without a browser: cases, refusals, wording, the viewer's windows and the report."""

import dataclasses

import numpy as np
from PIL import Image

from medtl.predict.predictor import load_run
from medtl_ui.analysis import explain_case, open_case
from medtl_ui.app import create_app, find_runs
from medtl_ui.case import store_case_files
from medtl_ui.view import MODEL_WINDOW, analyse, for_display, preset_window, render_view, run_case, window_presets
from medtl_ui.words import decision_text


def test_dicom_and_nifti_are_answered_and_noise_is_refused(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run)
    for path in [sample_dir / "dicom" / "img_0001.dcm", sample_dir / "nifti" / "vol_001.nii.gz"]:
        image, probs, overlay, message = analyse(predictor, str(path), workdir=tmp_path)
        assert image.ndim == 2 and overlay.shape == image.shape + (3,) and max(image.shape) >= 448
        assert set(probs) == set(predictor.class_names) and abs(sum(probs.values()) - 1) < 1e-5
        assert "Predicted class" in message
    png = tmp_path / "noise.png"  # a picture unlike any training image: refused by content, not by header
    Image.fromarray((np.random.default_rng(0).random((60, 70)) * 255).astype(np.uint8)).save(png)
    image, probs, overlay, message = analyse(predictor, str(png), workdir=tmp_path / "w")
    assert image is None and probs is None and "Not analysed" in message
    assert "does not look like the images the model was trained on" in message


def test_display_keeps_the_physical_aspect():
    shown = for_display(np.zeros((40, 50), np.uint8))
    assert abs(shown.shape[0] / shown.shape[1] - 40 / 50) < 0.01 and max(shown.shape) >= 448
    stretched = for_display(np.zeros((40, 50), np.uint8), aspect=2.0)  # rows twice as far apart as columns
    assert abs(stretched.shape[0] / stretched.shape[1] - 80 / 50) < 0.02


def test_bad_upload_gets_a_message_not_a_trace(tiny_run, tmp_path):
    predictor = load_run(tiny_run)
    bad = tmp_path / "upload.dcm"
    bad.write_text("hello")
    image, probs, _overlay, message = analyse(predictor, str(bad), workdir=tmp_path / "w")
    assert image is None and probs is None and "Cannot use this file" in message and "file 1 (.dcm)" in message
    assert "Traceback" not in message and str(tmp_path) not in message
    assert "Upload" in analyse(predictor, None)[3]


def test_an_identifying_file_name_never_reaches_the_page_or_the_disk(tiny_run, sample_dir, tmp_path):
    import shutil

    predictor = load_run(tiny_run)
    named = tmp_path / "Doe^John_MRN12345678_CT.dcm"
    shutil.copy(sample_dir / "dicom" / "img_0001.dcm", named)
    work = tmp_path / "work"
    work.mkdir()
    gradio_copy = work / "abc123" / named.name  # where Gradio puts an upload: moved away by the app
    gradio_copy.parent.mkdir()
    shutil.copy(named, gradio_copy)
    path, files, key = store_case_files([str(gradio_copy)], work)
    assert not gradio_copy.exists() and "Doe" not in str(path) and "12345678" not in str(path)
    assert files == ["file 1 (.dcm)"] and key.startswith("case-")
    _case, message = open_case(predictor, path, files=files, key=key)
    assert "Doe" not in message and "12345678" not in message and "Predicted class" in message
    assert not any("Doe" in p.name for p in work.rglob("*"))


def test_app_builds_for_a_run_or_a_folder_of_runs(tiny_run):
    assert find_runs(tiny_run) == [tiny_run]
    assert find_runs(tiny_run.parent) == [tiny_run]
    assert create_app(tiny_run.parent) is not None


def test_refusals_give_the_reason(tiny_run, sample_dir, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    predictor = load_run(tiny_run)
    assert predictor.input_record["modalities"] == ["CT"]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(blank)
    assert "blank" in analyse(predictor, str(blank), workdir=tmp_path / "w1")[3]
    rng = np.random.default_rng(0)
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[..., 0] = rng.integers(150, 255, (64, 64))  # strongly coloured: a photograph, not a scan
    photo[..., 2] = rng.integers(0, 60, (64, 64))
    Image.fromarray(photo).save(tmp_path / "cat.jpg")
    assert (
        "colour image, and the model was trained on grey images only"
        in analyse(predictor, str(tmp_path / "cat.jpg"), workdir=tmp_path / "w2")[3]
    )
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.save_as(tmp_path / "mr.dcm")
    message = analyse(predictor, str(tmp_path / "mr.dcm"), workdir=tmp_path / "w3")[3]
    assert "trained on CT" in message and "MR" in message
    assert str(mr.PatientName) not in message
    tiny = tmp_path / "tiny.png"  # far smaller than any training image
    Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(tiny)
    assert "16×16 pixels" in analyse(predictor, str(tiny), workdir=tmp_path / "w4")[3]
    predictor.input_record = {"modalities": ["CT"], "dimensions": [2]}
    message = analyse(predictor, str(sample_dir / "nifti" / "vol_001.nii.gz"), workdir=tmp_path / "w5")[3]
    assert "2D images only" in message
    *_, message, case = run_case(predictor, [str(sample_dir / "dicom" / "img_0001.dcm")], workdir=tmp_path / "w6")
    assert case is not None and "Predicted class" in message


def test_decision_wording_says_what_the_decision_rests_on(tiny_run, sample_dir):
    predictor = load_run(tiny_run)
    pred = predictor.predict(sample_dir / "dicom" / "img_0001.dcm")
    assert predictor.decision.threshold is not None and pred.decision == "operating point"
    text = decision_text(predictor, pred)
    assert "threshold" in text and "chosen on validation data" in text and "calibrated" in text
    predictor.decision = predictor.decision.replace(threshold=None, temperature=None)  # an old run: neither
    pred = predictor.predict(sample_dir / "dicom" / "img_0001.dcm")
    text = decision_text(predictor, pred)
    assert pred.decision == "argmax" and "most probable class" in text and "No decision threshold" in text
    assert "calibrated" not in text


def test_several_files_of_a_series_and_a_zip_are_read_as_one_scan(tiny_run, tmp_path):
    import zipfile

    from medtl.data import create_sample_series
    from medtl_ui.report import export_report
    from medtl_ui.view import slice_profile

    series = create_sample_series(tmp_path / "series", n_slices=6, size=48)
    files = sorted(str(p) for p in series.iterdir())
    predictor = load_run(tiny_run)
    _, probs, _overlay, message, case = run_case(predictor, files, workdir=tmp_path / "w1")
    assert case.scan.array.shape == (6, 48, 48) and "Predicted class" in message
    assert "middle slice only: slice" in message  # the tiny run judges a volume on its middle slice, and says so
    assert len(case.files) == 6 and "Series" in case.series_note and "different studies" not in case.series_note
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as z:
        for f in files:
            z.write(f, f.split("/")[-1])
    _, probs_zip, _, _, _case_zip = run_case(predictor, str(tmp_path / "s.zip"), workdir=tmp_path / "w2")
    assert probs_zip == probs
    report = export_report(predictor, case, tmp_path)
    pdf, png = report
    assert pdf.endswith(".pdf") and open(pdf, "rb").read(5) == b"%PDF-" and Image.open(png).size[0] > 700
    assert case.key in pdf
    assert case.prediction.get("slice_scores") is None and slice_profile(case) is None  # "middle": one input
    scores = [0.1, 0.2, 0.9, 0.3, 0.2, 0.1]  # a volume read slice by slice: the profile is drawn
    profile = slice_profile(
        dataclasses.replace(case, prediction={**case.prediction, "slice_scores": scores}, slice_index=2)
    )
    assert profile.ndim == 3 and profile.shape[2] == 3 and profile.shape[1] > 300
    flat = slice_profile(
        dataclasses.replace(case, prediction={**case.prediction, "slice_scores": [0.5] * 6}, slice_index=2)
    )
    assert not np.array_equal(profile, flat)  # the plot follows the scores


def test_two_studies_uploaded_together_get_no_answer_and_mixed_formats_are_refused(tiny_run, sample_dir, tmp_path):
    """Two patients' files uploaded at once are not answered (which one would be judged?); a DICOM series with a
    NIfTI beside it is refused with the reason, not answered with the NIfTI dropped."""
    from medtl.data import create_sample_series

    a = create_sample_series(tmp_path / "a", n_slices=4, size=48, seed=1)
    b = create_sample_series(tmp_path / "b", n_slices=3, size=48, seed=2, lesion=False)
    files = [str(p) for p in sorted(a.iterdir())] + [str(p) for p in sorted(b.iterdir())]
    predictor = load_run(tiny_run)
    path, names, key = store_case_files(files, tmp_path / "w")
    case, message = open_case(predictor, path, files=names, key=key)
    assert case is None and message.startswith("**Cannot use this upload** (7 files): the files come from 2 ")
    assert "one study of one patient per case" in message and "Predicted" not in message
    one, _ = open_case(predictor, *store_case_files([str(p) for p in sorted(a.iterdir())], tmp_path / "w1")[:1])
    assert one is not None and one.prediction  # one study alone is answered
    mixed = [str(p) for p in sorted(a.iterdir())] + [str(sample_dir / "nifti" / "vol_001.nii.gz")]
    path, names, key = store_case_files(mixed, tmp_path / "w2")
    case, message = open_case(predictor, path, files=names, key=key)
    assert case is None and "mixes DICOM and NIfTI files" in message and "one study per case" in message


def test_series_that_read_alike_are_told_apart_and_no_description_is_shown():
    from medtl_ui.case import series_options

    same = {"series_number": 2, "modality": "CT", "slices": 40, "size": [512, 512], "description": "DOE JOHN head"}
    options = series_options([{**same, "series_uid": "1.2.3"}, {**same, "series_uid": "1.2.4"}])
    assert [label for label, _ in options] == [
        "series 2 · CT · 40 slice(s) · 512×512 · 1 of 2 alike",
        "series 2 · CT · 40 slice(s) · 512×512 · 2 of 2 alike",
    ]  # (SeriesDescription is removed by medtl deid's profile: never shown, even when it looks harmless)


def test_viewer_windows_follow_the_model_and_the_units(tiny_run, sample_dir, tmp_path):
    from medtl.config import CT_WINDOWS

    predictor = load_run(tiny_run)
    path, names, key = store_case_files([str(sample_dir / "dicom" / "img_0001.dcm")], tmp_path / "w1")
    case, _ = open_case(predictor, path, files=names, key=key)
    choices, why = window_presets(predictor, case.scan)
    assert choices[0] == MODEL_WINDOW and "lung" in choices and not why
    assert preset_window(predictor, case.scan, MODEL_WINDOW) == CT_WINDOWS[predictor.config.data.ct_window]
    lung, _ = render_view(predictor, case, 0, *CT_WINDOWS["lung"], False, 0.45)
    bone, _ = render_view(predictor, case, 0, *CT_WINDOWS["bone"], False, 0.45)
    assert np.abs(lung.astype(int) - bone.astype(int)).mean() > 5
    with_map, caption = render_view(predictor, case, 0, *CT_WINDOWS["lung"], True, 0.45)
    assert with_map.ndim == 3 and "map on this slice" in caption
    # a picture names no modality: a CT model reads it as CT, so the viewer offers CT windows, and opens at the
    # model's own; a model of another modality gets no CT presets, and the reason
    png = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(1).random((48, 48)) * 255).astype(np.uint8)).save(png)
    from medtl.io import read_image

    picture = read_image(png)
    choices, why = window_presets(predictor, picture)
    assert "lung" in choices and not why
    assert preset_window(predictor, picture, MODEL_WINDOW) == CT_WINDOWS[predictor.config.data.ct_window]
    predictor.input_record = {**predictor.input_record, "modalities": ["MR"]}
    choices, why = window_presets(predictor, picture)
    assert "lung" not in choices and "Hounsfield" in why
    assert preset_window(predictor, picture, MODEL_WINDOW) == (127.5, 255.0)  # a picture: its type's range


def test_a_volume_judged_on_one_slice_has_no_map_elsewhere(tiny_run, sample_dir, tmp_path):
    predictor = load_run(tiny_run)
    path, names, key = store_case_files([str(sample_dir / "nifti" / "vol_001.nii.gz")], tmp_path / "w")
    case, _message = open_case(predictor, path, files=names, key=key)
    lv, wd = preset_window(predictor, case.scan, MODEL_WINDOW)
    _, caption = render_view(predictor, case, case.slice_index, lv, wd, True, 0.45)
    assert "map on this slice" in caption or "map is empty here" in caption  # (the tiny model's maps may be flat)
    other = (case.slice_index + 2) % case.n_slices
    _, caption = render_view(predictor, case, other, lv, wd, True, 0.45)
    assert f"judged slice {case.slice_index + 1} only" in caption


def test_a_volume_scored_slice_by_slice_gets_a_map_on_every_slice(tiny_run, sample_dir, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "slices_run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["volume_mode"] = "slices"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    predictor = load_run(run)
    path, names, key = store_case_files([str(sample_dir / "nifti" / "vol_001.nii.gz")], tmp_path / "w")
    case, message = open_case(predictor, path, files=names, key=key)
    assert case.refused is None and "Every slice of this volume was scored" in message
    explain_case(predictor, case, "occlusion")  # (the tiny model's Grad-CAM maps are flat)
    lv, wd = preset_window(predictor, case.scan, MODEL_WINDOW)
    other = (case.slice_index + 3) % case.n_slices
    _, caption = render_view(predictor, case, other, lv, wd, True, 0.45)
    assert "map on this slice" in caption and ("occlusion", None, other) in case.maps
    assert not np.array_equal(case.maps[("occlusion", None, other)], case.maps[("occlusion", None, case.slice_index)])


def test_the_case_key_does_not_depend_on_the_order_or_the_stored_names(tmp_path):
    from medtl.data import create_sample_series
    from medtl_ui.case import case_key

    files = sorted(create_sample_series(tmp_path / "s", n_slices=4, size=32).iterdir())
    keys = {
        store_case_files([str(f) for f in order], tmp_path / f"w{i}")[2]
        for i, order in enumerate([files, files[::-1], files[1:] + files[:1]])
    }
    assert len(keys) == 1 and keys == {case_key(files)}


def test_the_viewer_script_and_style_are_the_package_files():
    from medtl_ui.viewer import VIEWER_HEAD, read_static

    script, style = read_static("viewer.js"), read_static("viewer.css")
    assert "window.medtlViewer" in script and "#scan" in style
    head = VIEWER_HEAD
    login = read_static("login.js")
    assert head == f"<style>\n{style}</style>\n<script>\n{script}</script>\n<script>\n{login}</script>\n"  # as read


def _bars(panel: str) -> dict:
    import html
    import re

    found = re.findall(r'data-name="([^"]*)" data-probability="([0-9.]+)"(?: data-threshold="([0-9.]+)")?', panel)
    return {html.unescape(n): (float(p), float(t) if t else None) for n, p, t in found}


def test_the_bars_show_the_finding_against_the_threshold_the_sentence_names(tmp_path):
    """The defect: "Predicted class: lesion ... 0.42 >= 0.40" above a top bar "no lesion 58 %". Now one bar, the
    finding's probability, with the threshold marked on the same scale; for a first-class finding too."""
    from types import SimpleNamespace

    from medtl.predict.post import Decision
    from medtl_ui.words import answer_bars

    for names, positive in ((("no lesion", "lesion"), 1), (("malignant", "normal, benign"), 0)):
        finding, other = names[positive], names[1 - positive]
        d = Decision(names, temperature=1.0, threshold=0.40, rule="youden", positive=positive)
        model = SimpleNamespace(decision=d, run_dir=tmp_path, multi_label=False)
        panel = answer_bars(model, {finding: 0.42, other: 0.58})
        assert _bars(panel) == {finding: (0.42, 0.40)}  # no bar of the other class to read as the answer
        assert "42% (at or above the threshold 40%)" in panel and 'class="medtl-threshold" style="left:40.00%"' in panel
        assert d.label(np.array([0.58, 0.42] if positive else [0.42, 0.58])) == finding
        below = answer_bars(model, {finding: 0.38, other: 0.62})
        assert "38% (below the threshold 40%)" in below
    argmax = SimpleNamespace(decision=Decision(("a", "b", "c")), run_dir=tmp_path, multi_label=False)
    assert list(_bars(answer_bars(argmax, {"a": 0.2, "b": 0.5, "c": 0.3}))) == ["b", "c", "a"]  # the answer first
    assert "not analysed" in answer_bars(argmax, None) and "data-probability" not in answer_bars(argmax, None)


def test_below_the_quality_floor_no_answer_is_shown(tiny_run, sample_dir, tmp_path, monkeypatch):
    predictor = load_run(tiny_run)
    image, probs, overlay, message = analyse(predictor, str(sample_dir / "dicom" / "img_0001.dcm"), workdir=tmp_path)
    assert "Predicted class" in message and "Model quality:" in message and "[NOT EVALUATED]" in message
    monkeypatch.setenv("MEDTL_QUALITY_FLOOR", "1.01")  # (above any interval: the tiny run cannot reach it)
    image, probs, overlay, message = analyse(predictor, str(sample_dir / "dicom" / "img_0001.dcm"), workdir=tmp_path)
    assert image is None and probs is None and overlay is None
    assert "not fit to show answers" in message and "Predicted class" not in message
    from medtl_ui.words import model_summary

    assert model_summary(predictor).startswith("**[NOT FIT TO SHOW ANSWERS]** **[NOT EVALUATED]**")
    assert "finding *lesion* (against *no lesion*)" in model_summary(predictor)


def test_examples_are_those_the_model_would_not_refuse(tiny_run, sample_dir):
    """A model of another modality is not offered the CT examples it would refuse (it was, as buttons)."""
    from medtl_ui.app import _examples

    predictor = load_run(tiny_run)
    offered = _examples(predictor, sample_dir)
    assert [p.name for p in offered] == ["img_0003.dcm", "img_0001.dcm", "vol_001.nii.gz"]
    predictor.input_record = {**predictor.input_record, "modalities": ["US"]}  # an ultrasound model
    # the CT DICOM files are not offered; the NIfTI (no modality in the file: read as the model's) still is
    assert [p.name for p in _examples(predictor, sample_dir)] == ["vol_001.nii.gz"]


def test_the_report_s_legend_does_not_cover_its_title(tiny_run, sample_dir, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medtl_ui.report import _draw_probabilities

    predictor = load_run(tiny_run)
    path, names, key = store_case_files([str(sample_dir / "dicom" / "img_0003.dcm")], tmp_path)
    case, _ = open_case(predictor, path, files=names, key=key)
    fig = plt.figure(figsize=(8.27, 11.69), dpi=100)
    _draw_probabilities(fig, predictor, case, 0.6)
    fig.canvas.draw()
    ax = fig.axes[0]
    title, legend = ax.title.get_window_extent(), ax.get_legend().get_window_extent()
    assert not title.overlaps(legend), (title, legend)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lesion"]  # the finding's bar only
    plt.close(fig)
