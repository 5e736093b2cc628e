"""Fixtures of the browser tests: the app served once per module, one browser per module, and a fresh page
(browser context) per call of ``open_page``."""

from __future__ import annotations

import pytest

from tests.ui.browsing import ARGS, CHROMIUM, Page, served


@pytest.fixture(scope="module")
def server(tiny_run):
    """The app served once for the module: its URL."""
    with served(tiny_run) as url:
        yield url


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
