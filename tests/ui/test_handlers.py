"""The page's event handlers, driven through the running app with gradio_client.

Each handler is reached through the endpoint the page itself calls (named after the handler by
Gradio: ``/on_upload``, ``/on_view``, ``/on_alpha``; the unnamed lambdas become ``/lambda`` (jump),
``/lambda_1`` (export) and ``/lambda_2`` (model choice)). The upload's case lives in the server-side
session state of one client, so the follow-up calls of a test go through the same client.

Images come back as lossy WebP files: comparisons use tolerances, not exact equality.
"""

import os
import socket

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

ENDPOINTS = {"/on_upload", "/on_view", "/on_alpha", "/lambda", "/lambda_1", "/lambda_2"}
# outputs of /on_upload, in the order create_app lists them
VIEWER, PROBS, OVERLAY, MESSAGE, SLIDER, HEADER, PROFILE, SANITY, PRESET, LEVEL, WIDTH = range(11)


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


def _probs(label: dict) -> dict:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def test_the_page_exposes_its_handlers(client):
    assert ENDPOINTS <= set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])


def test_dicom_upload_gives_probabilities_overlay_and_decision(client, tiny_run, sample_dir):
    from medtl.inference import load_run

    classes = load_run(tiny_run).class_names
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm")
    assert "Predicted class" in out[MESSAGE] and "Cannot use" not in out[MESSAGE]
    probs = _probs(out[PROBS])
    assert set(probs) == {str(c) for c in classes} and abs(sum(probs.values()) - 1) < 1e-4
    assert out[PROBS]["label"] == max(probs, key=probs.get)
    assert f"Predicted class: {out[PROBS]['label']}" in out[MESSAGE]
    viewer, overlay = _img(out[VIEWER]), _img(out[OVERLAY])
    assert max(viewer.shape[:2]) >= 448 and max(overlay.shape[:2]) >= 448  # enlarged for the page
    assert viewer.std() > 5 and overlay.std() > 5  # not blank
    assert out[SLIDER]["visible"] is False  # a 2D image has no slice slider
    assert out[HEADER]["modality"] == "CT" and out[HEADER]["units"] == "HU" and out[HEADER]["format"] == "dicom"
    assert "PatientName" not in out[HEADER] and "PatientID" not in out[HEADER]


def test_nifti_volume_shows_the_slice_slider_with_the_right_maximum(client, tiny_run, sample_dir):
    import nibabel as nib

    path = sample_dir / "nifti" / "vol_001.nii.gz"
    out = _upload(client, tiny_run, path)
    assert "Predicted class" in out[MESSAGE]
    n_slices = out[HEADER]["shape"][0]
    assert n_slices > 1 and n_slices in nib.load(path).shape  # the header states the volume's slices
    slider = out[SLIDER]
    assert slider["visible"] is True and slider["maximum"] == n_slices - 1
    assert 0 <= slider["value"] <= n_slices - 1


def test_view_handler_follows_window_preset_and_slice(client, tiny_run, sample_dir):
    # window presets: a CT in Hounsfield units looks different in the lung and the bone window
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm")
    assert out[HEADER]["units"] == "HU"
    lung = _img(client.predict(0, "lung", 40, 400, api_name="/on_view"))
    bone = _img(client.predict(0, "bone", 40, 400, api_name="/on_view"))
    lung_again = _img(client.predict(0, "lung", 40, 400, api_name="/on_view"))
    assert lung.shape == bone.shape
    assert np.abs(lung - bone).mean() > 10, "lung and bone windows gave the same picture"
    assert np.abs(lung - lung_again).mean() < 1  # the same view twice is the same picture
    narrow = _img(client.predict(0, "custom", 40, 50, api_name="/on_view"))
    wide = _img(client.predict(0, "custom", 40, 4000, api_name="/on_view"))
    assert np.abs(narrow - wide).mean() > 10, "the custom level/width had no effect"

    # slices: a volume shows a different picture on another slice
    out = _upload(client, tiny_run, sample_dir / "nifti" / "vol_001.nii.gz")
    last = out[SLIDER]["maximum"]
    first_slice = _img(client.predict(0, "auto", 40, 400, api_name="/on_view"))
    last_slice = _img(client.predict(last, "auto", 40, 400, api_name="/on_view"))
    assert first_slice.shape == last_slice.shape
    assert np.abs(first_slice - last_slice).mean() > 2, "changing the slice did not change the viewer"


def test_opacity_handler_blends_saliency_over_the_image(client, tiny_run, sample_dir):
    out = _upload(client, tiny_run, sample_dir / "dicom" / "img_0001.dcm", alpha=0.45)
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


def test_jump_returns_the_cases_slice(client, tiny_run, sample_dir):
    from medtl.inference import load_run

    assert client.predict(api_name="/lambda") == 0  # no case yet
    path = sample_dir / "nifti" / "vol_002.nii.gz"
    out = _upload(client, tiny_run, path)
    expected = load_run(tiny_run).predict(path).slice_index or 0
    assert out[SLIDER]["value"] == expected
    client.predict(0 if expected else out[SLIDER]["maximum"], "auto", 40, 400, api_name="/on_view")  # look elsewhere
    assert client.predict(api_name="/lambda") == expected


def test_export_writes_a_one_page_png_report(client, tiny_run, sample_dir):
    assert client.predict(tiny_run.name, 0.45, api_name="/lambda_1") is None  # nothing to report yet
    _upload(client, tiny_run, sample_dir / "dicom" / "img_0002.dcm")
    report = client.predict(tiny_run.name, 0.45, api_name="/lambda_1")
    assert report and report.endswith(".png") and os.path.getsize(report) > 20_000
    with Image.open(report) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 800 < w < 4000 and 300 < h < 2000 and w > h  # one landscape page
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # drawn, not blank


def test_model_choice_describes_the_run(client, tiny_run):
    info, card = client.predict(tiny_run.name, api_name="/lambda_2")
    assert f"Loaded **{tiny_run.name}**" in info and "classes" in info
    assert "model card" in card.lower() or "Model card" in card


@pytest.mark.parametrize("name, content", [
    ("upload.dcm", b"hello, not a scan"),
    ("volume.nii.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40),  # a gzip header and nothing usable
], ids=["text-as-dicom", "truncated-nifti"])
def test_broken_upload_gets_a_typed_refusal(client, tiny_run, tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    out = _upload(client, tiny_run, bad)
    message = out[MESSAGE]
    assert message.startswith("**Cannot use this file**") and name in message, message
    assert out[VIEWER] is None and out[OVERLAY] is None and not out[PROBS]
    assert out[SLIDER]["visible"] is False
    assert "Traceback" not in message and 'File "' not in message and "Error:" not in message
    server_tmp = os.environ["GRADIO_TEMP_DIR"]  # the server's private upload folder
    for folder in (server_tmp, str(tmp_path), "/tmp/"):
        assert folder not in message, message
    # the page still works after a refusal
    assert "Predicted class" not in message
    assert client.predict(api_name="/lambda") == 0
