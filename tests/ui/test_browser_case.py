"""The served app, case by case, in a real browser (Debian's chromium, driven by Playwright).

One server for the module (``medtl_ui.app.launch``); each test opens a fresh browser context (its own
session), uploads through the page and checks what a clinician sees: a new case leaves nothing of the
previous one, foreign images are refused with a reason, the PDF report is one de-identified page, an
identifying file name never reaches the page, the viewer's drag and wheel work on the real app, and
``medtl serve`` removes its upload folder on SIGTERM. Every test saves screenshots of its states
(``tmp_path`` and ``/tmp/medtl_case_<name>.png``). Marked ``browser``: not in the default run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.ui.browsing import CHROMIUM, Page, _free_port, _wait_port

pytestmark = pytest.mark.browser
if CHROMIUM is None:
    pytestmark = [pytestmark, pytest.mark.skip(reason="chromium is not installed (apt-get install chromium)")]


def _stable_src(page, quiet: float = 0.8, timeout: float = 20.0) -> str:
    """The viewer image's src once it has not changed for ``quiet`` seconds (re-renders run without a
    progress indicator, so there is nothing else to wait for)."""
    deadline = time.monotonic() + timeout
    src, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = page.evaluate(
            "() => { const i = document.querySelector('#scan img'); return i && i.complete ? i.src : null; }"
        )
        if now != src:
            src, since = now, time.monotonic()
        elif src and time.monotonic() - since >= quiet:
            return src
        page.wait_for_timeout(100)
    raise AssertionError("the viewer image kept changing")


# -- helpers for the PDF --------------------------------------------------------------------------


def _pdf_streams(data: bytes) -> list[bytes]:
    """The PDF's streams, Flate-decoded where they are compressed."""
    out = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        raw = m.group(1)
        try:
            out.append(zlib.decompress(raw))
        except zlib.error:
            out.append(raw)
    return out


def _pdf_text(data: bytes) -> str:
    """The text drawn in a matplotlib PDF: the literal strings of its Tj/TJ operators, joined per operator
    (kerning splits a word into pieces inside a TJ array)."""
    pieces = []
    for s in _pdf_streams(data):
        for m in re.finditer(rb"\[((?:\((?:\\.|[^\\)])*\)|[^\]])*)\]\s*TJ|\(((?:\\.|[^\\)])*)\)\s*Tj", s):
            body = m.group(1) if m.group(1) is not None else b"(" + m.group(2) + b")"
            pieces.append(b"".join(re.findall(rb"\(((?:\\.|[^\\)])*)\)", body)).decode("latin-1"))
    return "\n".join(pieces)


# -- tests --------------------------------------------------------------------------------------


def test_two_cases_in_a_row_leave_no_stale_output(open_page, sample_dir):
    ui = open_page("two_cases")
    ui.upload(sample_dir / "dicom" / "img_0003.dcm", expect="Predicted class")
    first = ui.key()
    assert "file 1 (.dcm)" in ui.text("#case") and "img_0003" not in ui.text("#case")  # never a file's name
    assert not ui.page.locator("#slice").is_visible()  # a 2D image has no slices
    ui.export()
    assert ".pdf" in ui.text("#report")
    ui.shot("first_exported")

    message = ui.upload(sample_dir / "nifti" / "vol_001.nii.gz", expect="This volume of")
    assert re.search(r"This volume of \d+ slices was judged on", message), message
    assert "Predicted class" in message
    case = ui.text("#case")
    assert ui.key() != first and first not in case
    assert "file 1 (.nii.gz)" in case and "img_0003" not in case and "vol_001" not in case
    # the report of the first case is gone: no link, no file name
    assert ui.page.locator("#report a").count() == 0
    assert ".pdf" not in ui.text("#report") and first not in ui.page.content()
    assert ui.page.locator("#slice").is_visible()
    assert ui.page.locator("#slice input[type=range]").is_visible()
    # the upload box is ready for the next case (the previous one's file is not listed there)
    assert "img_0003" not in ui.text("#upload") and "vol_001" not in ui.text("#upload")
    ui.shot("second_case")


def test_a_foreign_image_is_refused(open_page, tmp_path):
    rng = np.random.default_rng(7)
    noise = tmp_path / "noise.png"
    Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(noise)
    colour = tmp_path / "colour.jpg"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = (rng.random((64, 64)) * 255).astype(np.uint8)
    rgb[..., 2] = (rng.random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(colour, quality=95)

    ui = open_page("foreign")
    message = ui.upload(noise, expect="Not analysed")
    assert message.startswith("Not analysed"), message
    assert "does not look like the images the model was trained on" in message
    probs = ui.text("#probabilities")
    assert "lesion" not in probs and "%" not in probs, probs
    assert ui.page.locator("#overlay img").count() == 0  # no saliency map for a refused image
    ui.shot("noise")

    message = ui.upload(colour, expect="colour image")
    assert message.startswith("Not analysed"), message
    probs = ui.text("#probabilities")
    assert "lesion" not in probs and "%" not in probs, probs
    ui.shot("colour")


def test_pdf_report_is_one_deidentified_page(open_page, sample_dir):
    ui = open_page("report")
    ui.upload(sample_dir / "dicom" / "img_0003.dcm", expect="Predicted class")
    key = ui.key()
    url = ui.export()
    assert url.startswith("http"), url
    name = url.split("?")[0].rsplit("/", 1)[-1]
    assert name.endswith(".pdf") and key in name, name
    assert key in ui.text("#report")
    ui.shot("exported")

    response = ui.page.request.get(url)
    assert response.ok, response.status
    data = response.body()
    assert data.startswith(b"%PDF-")
    text = _pdf_text(data)
    assert key in text, "the case key is not readable in the PDF (the text search would see nothing)"
    assert "Research software" in text
    # the PDF's objects and metadata (its streams' binary content, where 3 bytes may spell anything, left out)
    objects = re.sub(rb"stream\r?\n.*?\r?\nendstream", b"", data, flags=re.S)
    assert key.encode() in objects  # in the title
    assert b"SYN" not in objects and "SYN" not in text  # the synthetic PatientID / PatientName
    pages = re.findall(rb"/Type\s*/Page(?![a-zA-Z])", objects)
    assert len(pages) == 1, f"{len(pages)} pages"
    # the PNG beside it
    png = ui.page.locator("#report a[href*='.png']").first.get_attribute("href")
    assert ui.page.request.get(png).body().startswith(b"\x89PNG")


def test_identifying_file_name_never_reaches_the_page(open_page, sample_dir, tmp_path):
    named = tmp_path / "Doe^John_MRN12345678_CT.dcm"
    shutil.copy(sample_dir / "dicom" / "img_0001.dcm", named)
    ui = open_page("identifying_name")
    ui.upload(named, expect="Predicted class")
    assert "file 1 (.dcm)" in ui.text("#case")
    html = ui.page.content()
    assert "Doe" not in html and "12345678" not in html and "MRN" not in html
    # nor in anything the page fetched afterwards: the viewer/overlay images are served by random names
    srcs = ui.page.eval_on_selector_all("img", "imgs => imgs.map(i => i.src)")
    assert not any("Doe" in s or "12345678" in s for s in srcs), srcs
    ui.export()
    html = ui.page.content()
    assert "Doe" not in html and "12345678" not in html
    ui.shot("answered")


def test_viewer_drag_and_wheel_on_the_app(open_page, sample_dir):
    ui = open_page("viewer")
    page = ui.page
    ui.upload(sample_dir / "nifti" / "vol_001.nii.gz", expect="This volume of")
    img = page.locator("#scan img").first
    img.wait_for(state="visible", timeout=30_000)
    page.wait_for_function(
        "() => window.medtlViewer && document.querySelector('#scan img.medtl-viewer')"
        " && document.querySelector('#scan img').complete",
        timeout=10_000,
    )
    level, width = page.locator("#level input[type=number]"), page.locator("#width input[type=number]")
    preset = page.locator("#preset input").first
    rng = page.locator("#slice input[type=range]")
    l0, w0 = float(level.input_value()), float(width.input_value())
    assert preset.input_value() == "model's window"
    ui.shot("loaded")

    # left-drag: right widens the window, down raises the level; the preset becomes "custom"
    src0 = _stable_src(page)  # the renders the new case's level/width started (no progress shown) are in
    box = img.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 64, cy + 32, steps=12)
    page.mouse.up()
    page.wait_for_function(
        "([l, w]) => +document.querySelector('#level input').value > l"
        " && +document.querySelector('#width input').value > w",
        arg=[l0, w0],
        timeout=10_000,
    )
    page.wait_for_function("() => document.querySelector('#preset input').value === 'custom'", timeout=10_000)
    page.wait_for_function(
        "old => { const i = document.querySelector('#scan img'); return i && i.src && i.src !== old && i.complete; }",
        arg=src0,
        timeout=20_000,
    )
    ui.settle()
    assert preset.input_value() == "custom"
    assert float(width.input_value()) > w0 and float(level.input_value()) > l0
    ui.shot("dragged")

    # wheel over the image: the slice moves by one notch, within the slider's range
    s0, smax = int(float(rng.input_value())), int(float(rng.get_attribute("max")))
    caption0 = ui.text("#view-caption")
    src1 = _stable_src(page)
    step = 1 if s0 < smax else -1
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, 100 * step)
    page.wait_for_function(
        "s => +document.querySelector('#slice input[type=range]').value === s", arg=s0 + step, timeout=10_000
    )
    page.wait_for_function(
        "old => { const i = document.querySelector('#scan img'); return i && i.src && i.src !== old && i.complete; }",
        arg=src1,
        timeout=20_000,
    )
    page.wait_for_function("c => document.querySelector('#view-caption').innerText !== c", arg=caption0, timeout=10_000)
    ui.settle()
    assert f"Slice {s0 + step} of" in ui.text("#view-caption")  # the slider and the caption count alike, from 1
    assert preset.input_value() == "custom"  # a slice change keeps the window the user set
    ui.shot("wheeled")


def test_sigterm_removes_the_upload_folder(tiny_run, sample_dir, browser, tmp_path):
    private_tmp = tmp_path / "private-tmp"
    private_tmp.mkdir()
    upload = tmp_path / "sigterm_case.dcm"  # a name of its own (the app's examples are cached under theirs)
    shutil.copy(sample_dir / "dicom" / "img_0003.dcm", upload)
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medtl.cli", "serve", str(tiny_run), "--port", str(port)],
        env={**os.environ, "TMPDIR": str(private_tmp)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, proc)
        ui = Page(browser, f"http://127.0.0.1:{port}/", tmp_path, "sigterm")
        try:
            ui.upload(upload, expect="Predicted class")
            ui.shot("answered")
        finally:
            ui.close()
        folders = list(private_tmp.glob("medtl-ui-*"))
        assert len(folders) == 1, sorted(p.name for p in private_tmp.iterdir())
        stored = [p for p in folders[0].rglob("*") if p.is_file() and re.fullmatch(r"[0-9a-f]{32}\.dcm", p.name)]
        assert stored, sorted(str(p.relative_to(folders[0])) for p in folders[0].rglob("*"))
        assert not list(private_tmp.rglob("sigterm_case*"))  # the original name is nowhere on disk

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 0), proc.returncode
        assert not list(private_tmp.glob("medtl-ui-*")), sorted(p.name for p in private_tmp.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
