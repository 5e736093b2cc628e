"""The page's event handlers, driven through the running app with gradio_client.

Each handler is reached through the endpoint the page itself calls (``api_name`` in create_app). The
upload's case lives in the server-side session state of one client, so the follow-up calls of a test go
through the same client.

Images come back as lossy WebP files: comparisons use tolerances, not exact equality.
"""

import html
import os
import re
import socket

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

ENDPOINTS = {
    "/on_upload",
    "/on_clear",
    "/on_view",
    "/on_alpha",
    "/on_method",
    "/on_preset",
    "/on_series",
    "/on_model",
    "/jump",
    "/export",
    "/on_finding",
}
# outputs of /on_upload, in the order create_app lists them (the case state is not sent to the client)
(
    VIEWER,
    PROBS,
    OVERLAY,
    MESSAGE,
    SLIDER,
    HEADER,
    PROFILE,
    SANITY,
    PRESET,
    LEVEL,
    WIDTH,
    CASE,
    SERIES,
    REPORT,
    CAPTION,
    UPLOAD,
) = range(16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_run):
    import gradio as gr

    from medtl_ui.app import launch

    port = _free_port()
    launch(tiny_run, port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    gr.close_all()


@pytest.fixture
def client(url, tmp_path):
    """A fresh page session (its own case state); downloads go to tmp_path."""
    return gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def _upload(client, run, path, alpha=0.45, method="gradcam"):
    return client.predict(run.name, [gradio_client.handle_file(str(path))], method, alpha, api_name="/on_upload")


def _img(path) -> np.ndarray:
    assert path and os.path.isfile(path), path
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


BAR = re.compile(r'data-name="([^"]*)" data-probability="([0-9.]+)"(?: data-threshold="([0-9.]+)")?')


def _bars(panel: str) -> dict[str, tuple[float, float | None]]:
    """The answer's bars (medtl_ui.words.answer_bars): name -> (probability, its decision threshold or None)."""
    return {html.unescape(n): (float(p), float(t) if t else None) for n, p, t in BAR.findall(panel or "")}


def _probs(panel: str) -> dict[str, float]:
    return {n: p for n, (p, _) in _bars(panel).items()}


def test_the_page_exposes_its_handlers(client):
    assert ENDPOINTS.issubset(client.view_api(return_format="dict", print_info=False)["named_endpoints"])


def _view(client, run, index, level, width, show_map=False, alpha=0.45):
    return client.predict(run.name, index, level, width, show_map, alpha, api_name="/on_view")


def test_dicom_upload_gives_probabilities_overlay_and_decision(client, tiny_run, sample_dir):
    from medtl.predict.predictor import load_run

    classes = load_run(tiny_run).class_names
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm")
    assert "Predicted class" in out[MESSAGE] and "Cannot use" not in out[MESSAGE]
    assert {str(c) for c in classes} == {"no lesion", "lesion"}  # the classes' names, not 0/1
    bars = _bars(out[PROBS])
    assert list(bars) == ["lesion"]  # one bar: the finding's probability, its threshold marked on the same scale
    p, threshold = bars["lesion"]
    answer = "lesion" if p >= threshold else "no lesion"  # what the bar shows is what the sentence says
    assert f"Predicted class: {answer}" in out[MESSAGE]
    assert "chosen on validation data" in out[MESSAGE]
    viewer, overlay = _img(out[VIEWER]), _img(out[OVERLAY])
    assert max(viewer.shape[:2]) >= 448 and max(overlay.shape[:2]) >= 448  # enlarged for the page
    assert viewer.std() > 5 and overlay.std() > 5  # not blank
    assert out[SLIDER]["visible"] is False  # a 2D image has no slice slider
    assert out[HEADER]["modality"] == "CT" and out[HEADER]["units"] == "HU" and out[HEADER]["format"] == "dicom"
    assert "PatientName" not in out[HEADER] and "PatientID" not in out[HEADER]
    assert out[CASE].startswith("**Case case-") and "file 1 (.dcm)" in out[CASE] and "img_0001" not in out[CASE]
    assert out[UPLOAD]["value"] is None  # the upload box is cleared: the file's name leaves the page
    assert (out[LEVEL]["value"], out[WIDTH]["value"]) == (40.0, 400.0)  # the model's window (soft tissue)


def test_nifti_volume_shows_the_slice_slider_with_the_right_maximum(client, tiny_run, sample_dir):
    import nibabel as nib

    path = sample_dir / "nifti" / "vol_001.nii.gz"
    out = _upload(client, tiny_run, path)
    assert "Predicted class" in out[MESSAGE] and "judged on its middle slice only" in out[MESSAGE]
    n_slices = out[HEADER]["shape"][0]
    assert n_slices > 1 and n_slices in nib.load(path).shape  # the header states the volume's slices
    slider = out[SLIDER]
    # numbered from 1, as the caption says "Slice k of n" (it was 0-based: off by one from the caption)
    assert slider["visible"] is True and slider["minimum"] == 1 and slider["maximum"] == n_slices
    assert 1 <= slider["value"] <= n_slices


def test_view_handler_follows_window_and_slice(client, tiny_run, sample_dir):
    from medtl.config import CT_WINDOWS

    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm")
    assert out[HEADER]["units"] == "HU" and "lung" in [c[0] for c in out[PRESET]["choices"]]
    lung_w = client.predict(tiny_run.name, "lung", api_name="/on_preset")
    assert tuple(lung_w) == CT_WINDOWS["lung"]
    lung = _img(_view(client, tiny_run, 1, *CT_WINDOWS["lung"])[0])
    bone = _img(_view(client, tiny_run, 1, *CT_WINDOWS["bone"])[0])
    lung_again = _img(_view(client, tiny_run, 1, *CT_WINDOWS["lung"])[0])
    assert lung.shape == bone.shape
    assert np.abs(lung - bone).mean() > 10, "lung and bone windows gave the same picture"
    assert np.abs(lung - lung_again).mean() < 1  # the same view twice is the same picture
    plain = _img(_view(client, tiny_run, 1, 40, 400, show_map=False)[0])
    mapped, caption = _view(client, tiny_run, 1, 40, 400, show_map=True)
    assert "map on this slice" in caption and np.abs(_img(mapped) - plain).mean() > 1  # the map on the viewer

    out = _upload(client, tiny_run, sample_dir / "nifti" / "vol_001.nii.gz")
    last = out[SLIDER]["maximum"]
    first_slice = _img(_view(client, tiny_run, 1, 40, 400)[0])
    last_slice = _img(_view(client, tiny_run, last, 40, 400)[0])
    assert first_slice.shape == last_slice.shape
    assert np.abs(first_slice - last_slice).mean() > 2, "changing the slice did not change the viewer"


def test_opacity_handler_blends_saliency_over_the_image(client, tiny_run, sample_dir):
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm", alpha=0.45, method="occlusion")
    initial = _img(out[OVERLAY])
    clear = _img(client.predict(0.0, api_name="/on_alpha"))
    full = _img(client.predict(1.0, api_name="/on_alpha"))
    again = _img(client.predict(0.45, api_name="/on_alpha"))
    assert clear.shape == full.shape == initial.shape

    def colour(a):  # mean spread between the channels: 0 for a grey picture
        return float((a.max(axis=-1) - a.min(axis=-1)).mean())

    # opacity 0 is the plain (grey) CT image: no colour from the saliency map at all
    assert colour(clear) < 4, colour(clear)
    assert colour(full) > colour(clear) + 20
    assert np.abs(full - clear).mean() > 10
    assert np.abs(again - initial).mean() < 2  # back to the upload's opacity: the upload's overlay


def test_switching_the_saliency_method_keeps_the_prediction(client, tiny_run, sample_dir, monkeypatch):
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm", method="gradcam")
    before = _img(out[OVERLAY])
    overlay, sanity, _view, caption = client.predict(
        tiny_run.name, "occlusion", 0.45, 1, 40, 400, True, api_name="/on_method"
    )
    assert "occlusion" in sanity and "occlusion map on this slice" in caption
    assert np.abs(_img(overlay) - before).mean() > 1  # a new map
    report = client.predict(tiny_run.name, 0.45, api_name="/export")  # the same case, its prediction kept
    assert report and any(r.endswith(".pdf") for r in report)


def test_jump_returns_the_cases_slice(client, tiny_run, sample_dir):
    from medtl.predict.predictor import load_run

    assert client.predict(api_name="/jump") == 1  # no case yet
    path = sample_dir / "nifti" / "vol_002.nii.gz"
    out = _upload(client, tiny_run, path)
    expected = (load_run(tiny_run).predict(path).slice_index or 0) + 1  # the slider counts from 1
    assert out[SLIDER]["value"] == expected
    _view(client, tiny_run, 1 if expected > 1 else out[SLIDER]["maximum"], 40, 400)  # look elsewhere
    assert client.predict(api_name="/jump") == expected


def test_export_writes_a_one_page_pdf_and_png_report(client, tiny_run, sample_dir):
    assert client.predict(tiny_run.name, 0.45, api_name="/export") is None  # nothing to report yet
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0002.dcm")
    key = out[CASE].split("**Case ")[1].split("**")[0]
    report = client.predict(tiny_run.name, 0.45, api_name="/export")
    pdf = next(r for r in report if r.endswith(".pdf"))
    png = next(r for r in report if r.endswith(".png"))
    assert key in pdf and key in png  # named by the case key
    data = open(pdf, "rb").read()
    assert data.startswith(b"%PDF-") and data.count(b"/Type /Page") - data.count(b"/Type /Pages") == 1  # one page
    assert b"SYN" not in data  # no patient identifier (the sample's PatientIDs are SYN...)
    with Image.open(png) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 600 < w < 4000 and h > w  # one portrait page
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # drawn, not blank


def test_a_new_upload_clears_the_previous_cases_outputs(client, tiny_run, sample_dir):
    _upload(client, tiny_run, sample_dir / "dicom" / "img_0003.dcm")
    first = client.predict(tiny_run.name, 0.45, api_name="/export")
    out = _upload(client, tiny_run, sample_dir / "nifti" / "vol_001.nii.gz")
    assert out[REPORT] is None  # the first case's report is gone
    second = client.predict(tiny_run.name, 0.45, api_name="/export")
    assert os.path.basename(first[0]) != os.path.basename(second[0])  # a report of the new case, by its key
    out = client.predict(tiny_run.name, None, "gradcam", 0.45, api_name="/on_clear")
    assert out[VIEWER] is None and "data-probability" not in out[PROBS] and out[OVERLAY] is None and out[REPORT] is None
    assert client.predict(tiny_run.name, 0.45, api_name="/export") is None


def test_model_choice_describes_the_run(client, tiny_run):
    out = client.predict(tiny_run.name, api_name="/on_model")
    info, card = out[0], out[1]
    assert f"Model **{tiny_run.name}**" in info and "finding *lesion* (against *no lesion*)" in info
    assert info.startswith("**[NOT EVALUATED]** **[SMALL TEST SET (")  # the model's quality, first
    assert "calibrated on validation data" in info and "refuses images unlike its training images" in info
    assert "medtl evaluate" not in card and "not been through a full evaluation" in card  # a clinician's words


def test_a_foreign_image_is_refused_with_its_reason(client, tiny_run, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8)).save(noise)
    out = _upload(client, tiny_run, noise)
    assert out[MESSAGE].startswith("**Not analysed**") and "does not look like" in out[MESSAGE]
    # viewable, not answered
    assert out[VIEWER] is not None and out[OVERLAY] is None and "data-probability" not in out[PROBS]
    assert client.predict(tiny_run.name, 0.45, api_name="/export") is None  # no report of a refused case


def test_a_decompression_bomb_gets_a_plain_message(client, tiny_run, tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # declares 100000 x 100000 pixels
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    out = _upload(client, tiny_run, bomb)
    assert out[MESSAGE].startswith("**Cannot use this file**"), out[MESSAGE]
    assert "DecompressionBomb" not in out[MESSAGE] and "Analysis failed" not in out[MESSAGE]


@pytest.mark.parametrize(
    "name, content",
    [
        ("upload.dcm", b"hello, not a scan"),
        ("volume.nii.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40),  # a gzip header and nothing usable
    ],
    ids=["text-as-dicom", "truncated-nifti"],
)
def test_broken_upload_gets_a_typed_refusal(client, tiny_run, tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    out = _upload(client, tiny_run, bad)
    message = out[MESSAGE]
    assert message.startswith("**Cannot use this file** (file 1 (") and name not in message, message
    assert out[VIEWER] is None and out[OVERLAY] is None and "data-probability" not in out[PROBS]
    assert out[SLIDER]["visible"] is False
    assert "Traceback" not in message and 'File "' not in message and "Error:" not in message
    server_tmp = os.environ["GRADIO_TEMP_DIR"]  # the server's private upload folder
    for folder in (server_tmp, str(tmp_path), "/tmp/"):
        assert folder not in message, message
    # the page still works after a refusal
    assert "Predicted class" not in message
    assert client.predict(api_name="/jump") == 1  # (no case: the first slice, counted from 1)


@pytest.fixture(scope="module")
def multilabel_page(tmp_path_factory):
    """A page serving a small multi-label run (lesion and calcification)."""
    import gradio as gr

    from medtl.config import load_config
    from medtl.data import create_multilabel_sample
    from medtl.train import run_experiment
    from medtl_ui.app import launch

    root = tmp_path_factory.mktemp("mlpage")
    manifest = create_multilabel_sample(root / "data", n_patients=40, size=48, seed=2)
    run = run_experiment(
        load_config(
            data={"path": str(manifest), "augment": False},
            encoder={"input_size": 64},
            train={"epochs": 1, "frozen_epochs": 1, "batch_size": 8, "ood": "off"},
            explain={"n_overlays": 0},
        ),
        root / "run",
    )
    port = _free_port()
    launch(run, port=port, prevent_thread_lock=True)
    yield run, manifest.parent, f"http://127.0.0.1:{port}/"
    gr.close_all()


def test_multilabel_page_lists_each_finding_and_draws_the_map_of_the_one_chosen(multilabel_page, tmp_path):
    run, data, url = multilabel_page
    client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    out = _upload(client, run, data / "dicom" / "img_0002.dcm")
    assert "Findings:" in out[MESSAGE] and "calcification" in out[MESSAGE] and "lesion" in out[MESSAGE]
    probs = _probs(out[PROBS])
    assert set(probs) == {"calcification", "lesion"}  # independent: they need not add up to 1
    menu = next(
        o
        for o in out
        if isinstance(o, dict)
        and o.get("choices")
        and {c[0] if isinstance(c, (list, tuple)) else c for c in o["choices"]} == {"calcification", "lesion"}
    )
    assert menu["visible"] is True and menu["value"] == max(probs, key=probs.get)  # the most probable finding's map
    other = next(c for c in ("calcification", "lesion") if c != menu["value"])
    overlay, _sanity, _view, _caption = client.predict(
        run.name, other, "gradcam", 0.45, 1, 40, 400, True, api_name="/on_finding"
    )
    assert np.abs(_img(overlay) - _img(out[OVERLAY])).mean() > 1  # the other finding's map


# -- the handlers' updates, without a server -------------------------------------------------------------


def test_an_update_names_what_it_changes_and_leaves_the_rest():
    import gradio as gr

    from medtl_ui.app import gradio_outputs
    from medtl_ui.handlers import PageUpdate, change

    update = PageUpdate(level=40.0, width=change(value=400.0, interactive=False))
    assert update.changed() == {"level", "width"}
    assert gradio_outputs(update, ("level", "width", "preset")) == (
        40.0,
        gr.update(value=400.0, interactive=False),
        gr.update(),
    )  # the preset is left as it is
    assert gradio_outputs(PageUpdate(slice=3), ("slice",)) == 3  # one output: its value alone
    with pytest.raises(ValueError, match="overlay"):  # a change the event cannot show is a bug, not a silent loss
        gradio_outputs(PageUpdate(overlay=None, level=1.0), ("level", "width"))


def test_every_case_output_is_reset_by_a_new_upload_or_none(tiny_run, sample_dir, tmp_path):
    from medtl_ui.app import CASE_OUTPUTS
    from medtl_ui.handlers import Page

    page = Page([tiny_run], tmp_path)
    case = None
    for files in (None, [str(sample_dir / "dicom" / "img_0001.dcm")], [str(sample_dir / "nifti" / "vol_001.nii.gz")]):
        update = page.on_upload(tiny_run.name, case, files, "gradcam", 0.45)
        assert update.changed() == set(CASE_OUTPUTS), files  # nothing of the previous case survives
        if case is not None:
            assert not case.path.exists()  # the previous case ended: its upload is deleted
        case = update.case
    assert update.case.n_slices > 1 and update.slice.settings["visible"] is True
    assert page.on_jump(update.case).slice == update.case.slice_index + 1  # (the slider counts from 1)
    assert page.on_series(tiny_run.name, update.case, None, "gradcam", 0.45).changed() == set()  # no series picked
