"""Fixtures of the browser tests: the app served once per module, one browser per module, and a fresh page
(browser context) per call of ``open_page``."""

from __future__ import annotations

import os

import pytest

from tests.ui.browsing import ARGS, CHROMIUM, Page, _free_port


@pytest.fixture(scope="module")
def server(tiny_run):
    """The app served once for the module: its URL."""
    import gradio as gr

    from medtl_ui.app import launch

    port = _free_port()
    old = os.environ.get("GRADIO_TEMP_DIR")
    launch(tiny_run, port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        gr.close_all()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(server, browser, tmp_path):
    pages = []

    def make(name: str) -> Page:
        pages.append(Page(browser, server, tmp_path, name))
        return pages[-1]

    yield make
    for p in pages:
        p.close()
