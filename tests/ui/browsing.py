"""Helpers of the browser tests (Debian's chromium driven by Playwright): the browser's arguments, free ports, and
:class:`Page`, one browser session on the app with the actions the tests repeat."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
KEY = re.compile(r"case-[0-9a-f]{12}")
ANSWER = 60_000  # ms: a first analysis loads the model's code paths
# Gradio's loading overlay on an element is gone (no update pending)
_SETTLED = (
    "sel => [...document.querySelectorAll(sel + ' [data-testid=status-tracker]')]"
    ".every(s => s.classList.contains('hide'))"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before it answered")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing answered on port {port} within {timeout:.0f} s")


@contextmanager
def served(run, **options) -> Iterator[str]:
    """The app of ``run`` served on a free port for the block: its URL. Only this app is closed at the end
    (``gr.close_all()`` would also close the module's server that later tests use), and ``GRADIO_TEMP_DIR``, which
    ``launch`` points at its upload folder, is given back its value from before."""
    import gradio as gr

    from medtl_ui.app import launch

    before = set(map(id, gr.Blocks.get_instances()))
    old = os.environ.get("GRADIO_TEMP_DIR")
    port = _free_port()
    try:
        launch(run, port=port, prevent_thread_lock=True, **options)
        yield f"http://127.0.0.1:{port}/"
    finally:
        for blocks in gr.Blocks.get_instances():
            if id(blocks) not in before and blocks.is_running:
                blocks.close()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


# -- fixtures -----------------------------------------------------------------------------------


class Page:
    """One browser session on the app, with the few actions the tests repeat."""

    def __init__(self, browser, url: str, tmp_path: Path, name: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.tmp_path, self.name, self.shots = tmp_path, name, []
        self.page.goto(url, wait_until="load")
        self.page.locator("#upload input[type=file]").first.wait_for(state="attached", timeout=60_000)

    def text(self, sel: str) -> str:
        return self.page.locator(sel).first.inner_text()

    def upload(self, *paths: Path, expect: str) -> str:
        """Upload files as a new case; wait until ``#message`` changed and holds ``expect``; the message."""
        old = self.text("#message")
        self.page.locator("#upload input[type=file]").first.set_input_files([str(p) for p in paths])
        self.page.wait_for_function(
            "([old, want]) => { const m = document.querySelector('#message');"
            " return m && m.innerText !== old && m.innerText.includes(want); }",
            arg=[old, expect],
            timeout=ANSWER,
        )
        self.settle()
        return self.text("#message")

    def settle(self) -> None:
        """No update pending on the outputs a case fills."""
        for sel in ("#message", "#scan", "#probabilities", "#overlay", "#case"):
            self.page.wait_for_function(_SETTLED, arg=sel, timeout=30_000)

    def export(self) -> str:
        """Click the export button; the PDF's URL once its link is in ``#report``."""
        self.page.locator("#export").click()
        link = self.page.locator("#report a[href*='.pdf']").first
        link.wait_for(state="attached", timeout=ANSWER)
        self.page.wait_for_function(_SETTLED, arg="#report", timeout=30_000)
        return link.get_attribute("href")

    def key(self) -> str:
        m = KEY.search(self.text("#case"))
        assert m, f"no case key in #case: {self.text('#case')!r}"
        return m.group(0)

    def shot(self, state: str) -> Path:
        path = self.tmp_path / f"{self.name}_{state}.png"
        self.page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, f"/tmp/medtl_case_{self.name}_{state}.png")
        self.shots.append(path)
        return path

    def close(self) -> None:
        self.context.close()
        assert all(p.stat().st_size > 0 for p in self.shots)
        assert not self.errors, self.errors
