"""End-to-end check in a real browser (Debian's chromium, driven by Playwright).

Marked ``browser``: not in the default run. Needs ``/usr/bin/chromium`` and the ``playwright``
Python package (``pip install -e '.[browser]'``).
"""

import shutil
import socket

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_upload_dicom_shows_prediction_and_overlay(tiny_run, sample_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from medtl_ui.app import launch

    port = _free_port()
    app, _, _ = launch(tiny_run, port=port, prevent_thread_lock=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.locator("input[type=file]").first.wait_for(state="attached", timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(sample_dir / "dicom" / "img_0001.dcm"))
            page.get_by_text("Predicted class").wait_for(timeout=60_000)
            page.locator("#overlay img").first.wait_for(state="visible", timeout=30_000)
            assert page.locator("#probabilities").inner_text().count("%") >= 1
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
            shutil.copy(tmp_path / "ui.png", "/tmp/medtl_ui_screenshot.png")
            browser.close()
    finally:
        import gradio as gr

        gr.close_all()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_evaluation_report_opens_offline_in_a_browser(tiny_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from medtl.eval.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    evaluate_run(run, n_boot=50, methods=("gradcam",), data_randomisation=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route("http*://**", lambda route: route.abort())  # offline: nothing may be fetched
        page.goto((run / "evaluation" / "report.html").as_uri())
        assert "Test AUC" in page.locator("#auc").inner_text()
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) >= 4 and all(w > 0 for w in widths)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        shutil.copy(tmp_path / "report.png", "/tmp/medtl_report_screenshot.png")
        browser.close()
