"""The radiology viewer (``medtl_ui.viewer``) in a real browser (Debian's chromium, driven by Playwright).

A minimal Blocks renders slices of a generated volume on the server from ``#level``/``#width``/``#slice``;
the test drags, wheels, zooms and types on the image and checks that the controls moved the right way,
that the server re-rendered, and that zoom/pan stay client side. Marked ``browser``: not in the default run.
"""

import shutil
import socket
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

N_SLICES, SIZE = 20, 128
LEVEL0, WIDTH0, SLICE0 = 40, 400, 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Gradio's loading overlay on the image is gone (no render pending)
_SETTLED = (
    "() => [...document.querySelectorAll('#scan [data-testid=status-tracker]')]"
    ".every(s => s.classList.contains('hide'))"
)


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _volume() -> np.ndarray:
    """A phantom of 20 slices of 128x128 HU: air around a disc whose radius changes slice by slice, a
    horizontal soft-tissue ramp inside it and a bright 'bone' that moves from slice to slice."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    vol = np.full((N_SLICES, SIZE, SIZE), -1000.0, dtype=np.float32)
    for k in range(N_SLICES):
        inside = r < 36 + k
        vol[k][inside] = (-300.0 + 600.0 * xx / SIZE + 15.0 * k)[inside]
        vol[k][np.hypot(yy - 40 - 2 * k, xx - 80) < 8] = 800.0
    return vol


def _app(calls: list, typed: list):
    import gradio as gr
    from PIL import Image, ImageDraw

    vol = _volume()
    lock = threading.Lock()

    def render(level, width, index):
        with lock:
            calls.append((level, width, index))
        level, width = float(level or 0), max(float(width or 1), 1.0)
        k = int(np.clip(round(float(index or 0)), 0, N_SLICES - 1))
        grey = (np.clip((vol[k] - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
        im = Image.fromarray(grey).convert("RGB")
        ImageDraw.Draw(im).text((4, 4), f"{k}", fill=(255, 0, 0))  # the slice index, drawn in
        return np.asarray(im)

    from medtl_ui.viewer import VIEWER_HELP

    with gr.Blocks(analytics_enabled=False) as demo:
        gr.Markdown(VIEWER_HELP)
        scan = gr.Image(elem_id="scan", type="numpy", interactive=False, height=420)
        with gr.Row():
            level = gr.Number(LEVEL0, elem_id="level", label="Level")
            width = gr.Number(WIDTH0, elem_id="width", label="Width", minimum=1)
        index = gr.Slider(0, N_SLICES - 1, value=SLICE0, step=1, elem_id="slice", label="Slice")
        flat = gr.Checkbox(False, elem_id="flat", label="2D (hides the slice slider)")
        inputs = [level, width, index]
        gr.on([level.change, width.change, index.change], render, inputs, scan)
        # what an app does to switch a preset dropdown to "custom": Gradio's `.input` fires for the viewer too
        gr.on([level.input, width.input], lambda: typed.append("window"), None, None)
        index.input(lambda: typed.append("slice"), None, None)
        flat.change(lambda f: gr.update(visible=not f), flat, index)
        demo.load(render, inputs, scan)
    return demo


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_viewer_mouse_and_keyboard(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    import gradio as gr

    from medtl_ui.viewer import VIEWER_HEAD

    calls: list = []
    typed: list = []
    port = _free_port()
    demo = _app(calls, typed)
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        footer_links=[],
        ssr_mode=False,
        head=VIEWER_HEAD,
    )
    shots = []

    def settle():
        """No render pending: the loading overlay on the image is hidden and stays so, and no call came."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            page.wait_for_function(_SETTLED, timeout=10_000)
            n = len(calls)
            page.wait_for_timeout(400)
            if len(calls) == n and page.evaluate(_SETTLED):
                return
        raise AssertionError("the server kept rendering")

    def shot(page, name):
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, f"/tmp/medtl_viewer_{name}.png")
        shots.append(path)

    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")

            img = page.locator("#scan img").first
            img.wait_for(state="visible", timeout=60_000)
            page.wait_for_function(
                "() => window.medtlViewer && document.querySelector('#scan img.medtl-viewer')", timeout=10_000
            )
            level = page.locator("#level input[type=number]")
            width = page.locator("#width input[type=number]")
            rng = page.locator("#slice input[type=range]")

            def src():
                return img.get_attribute("src")

            def wait_new_src(old):
                page.wait_for_function(
                    "old => { const i = document.querySelector('#scan img');"
                    " return i && i.src && i.src !== old && i.complete; }",
                    arg=old,
                    timeout=20_000,
                )

            def transform():
                return page.eval_on_selector("#scan img", "i => getComputedStyle(i).transform")

            def scale():
                t = transform()
                return 1.0 if t == "none" else float(t.split("(")[1].split(",")[0])

            page.wait_for_function("() => document.querySelector('#scan img').complete")
            assert float(level.input_value()) == LEVEL0 and float(width.input_value()) == WIDTH0
            assert rng.input_value() == str(SLICE0)
            page.wait_for_function(
                "() => document.querySelector('#scan .medtl-viewer-hud').textContent.includes('slice 11/20')",
                timeout=5_000,
            )
            shot(page, "initial")

            # 1. left-drag: right widens the window, down raises the level; throttled, then re-rendered
            box = img.bounding_box()
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            before, n_calls = src(), len(calls)
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx + 64, cy + 32, steps=20)
            page.mouse.up()
            k = WIDTH0 / 256
            page.wait_for_function(
                "([l, w]) => +document.querySelector('#level input').value === l"
                " && +document.querySelector('#width input').value === w",
                arg=[LEVEL0 + 32 * k, WIDTH0 + 64 * k],
                timeout=5_000,
            )
            assert float(width.input_value()) > WIDTH0 and float(level.input_value()) > LEVEL0
            commits = page.evaluate("() => window.medtlViewer.stats.commits")
            assert 1 <= commits < 20, commits  # throttled: far fewer updates than mouse moves
            wait_new_src(before)
            _wait_until(lambda: any(c[:2] == (LEVEL0 + 32 * k, WIDTH0 + 64 * k) for c in calls[n_calls:]))
            settle()
            assert scale() == 1.0  # a window/level drag does not move the image
            _wait_until(lambda: "window" in typed)
            shot(page, "window_level")

            # 2. wheel: one notch = one slice, the page does not scroll, the server re-renders
            before = src()
            scroll0 = page.evaluate("() => window.scrollY")
            for _ in range(3):
                page.mouse.wheel(0, 100)
            page.wait_for_function(
                "() => document.querySelector('#slice input[type=range]').value === '13'", timeout=5_000
            )
            page.mouse.wheel(0, -100)
            page.wait_for_function(
                "() => document.querySelector('#slice input[type=range]').value === '12'", timeout=5_000
            )
            assert page.evaluate("() => window.scrollY") == scroll0
            wait_new_src(before)
            page.wait_for_function(
                "() => document.querySelector('#scan .medtl-viewer-hud').textContent.includes('slice 13/20')",
                timeout=5_000,
            )
            _wait_until(lambda: calls[-1][2] == 12 and "slice" in typed)
            settle()
            shot(page, "wheel_slices")

            # 3. ctrl+wheel zooms (client side only), shift+drag pans, double-click resets
            n_calls = len(calls)
            page.mouse.move(cx, cy)
            page.keyboard.down("Control")
            page.mouse.wheel(0, -200)
            page.keyboard.up("Control")
            page.wait_for_function(
                "() => getComputedStyle(document.querySelector('#scan img')).transform !== 'none'", timeout=5_000
            )
            assert scale() > 1.0
            t_zoomed = transform()
            page.keyboard.down("Shift")
            page.mouse.down()
            page.mouse.move(cx + 30, cy + 20, steps=5)
            page.mouse.up()
            page.keyboard.up("Shift")
            t_panned = transform()
            assert t_panned != t_zoomed and scale() > 1.0
            e0, f0 = (float(v) for v in t_zoomed.rstrip(")").split(",")[4:6])
            e1, f1 = (float(v) for v in t_panned.rstrip(")").split(",")[4:6])
            assert e1 - e0 == pytest.approx(30, abs=1) and f1 - f0 == pytest.approx(20, abs=1)
            assert float(width.input_value()) == WIDTH0 + 64 * k  # shift+drag did not touch the window
            # right-drag pans too, and the context menu is suppressed
            page.mouse.down(button="right")
            page.mouse.move(cx + 10, cy + 30, steps=5)
            page.mouse.up(button="right")
            assert transform() != t_panned
            clip = page.eval_on_selector(
                "#scan img", "i => getComputedStyle(i.closest('.image-frame') || i.parentElement).overflow"
            )
            assert clip == "hidden"
            shot(page, "zoomed")
            page.wait_for_timeout(300)
            assert len(calls) == n_calls  # zoom and pan never reached the server
            img.dblclick()
            page.wait_for_function(
                "() => getComputedStyle(document.querySelector('#scan img')).transform === 'none'", timeout=5_000
            )
            # keys: + zooms, r resets
            img.focus()
            page.keyboard.press("+")
            assert scale() == pytest.approx(1.25)
            page.keyboard.press("r")
            assert transform() == "none"

            # 4. keyboard on the focused image: ArrowDown / ArrowUp / End move the slice
            before = src()
            img.focus()
            assert page.evaluate("() => document.activeElement === document.querySelector('#scan img')")
            page.keyboard.press("ArrowDown")
            page.wait_for_function(
                "() => document.querySelector('#slice input[type=range]').value === '13'", timeout=5_000
            )
            wait_new_src(before)
            page.keyboard.press("End")
            page.keyboard.press("ArrowDown")  # clamped at the last slice
            page.wait_for_function(
                f"() => document.querySelector('#slice input[type=range]').value === '{N_SLICES - 1}'", timeout=5_000
            )
            page.wait_for_function(
                f"() => document.querySelector('#scan .medtl-viewer-hud')"
                f".textContent.includes('slice {N_SLICES}/{N_SLICES}')",
                timeout=5_000,
            )
            page.wait_for_timeout(300)
            assert rng.input_value() == str(N_SLICES - 1)
            _wait_until(lambda: calls[-1][2] == N_SLICES - 1)
            settle()
            shot(page, "keyboard")

            # 5. a 2D image (the slider hidden): the wheel is left to the page, drag still sets the window
            page.evaluate(
                "() => window.addEventListener('wheel', e => { window.__lastWheelPrevented = e.defaultPrevented; })"
            )
            page.locator("#flat input[type=checkbox]").check()
            page.wait_for_function(
                "() => { const s = document.querySelector('#slice'); return !s || s.getClientRects().length === 0; }",
                timeout=10_000,
            )
            n_calls = len(calls)
            page.mouse.move(cx, cy)
            page.mouse.wheel(0, 100)
            page.wait_for_function("() => window.__lastWheelPrevented === false", timeout=5_000)
            page.wait_for_timeout(300)
            assert len(calls) == n_calls
            page.wait_for_function(
                "() => !document.querySelector('#scan .medtl-viewer-hud').textContent.includes('slice')", timeout=5_000
            )
            before = src()
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx - 128, cy, steps=5)  # left: narrower window
            page.mouse.up()
            page.wait_for_function(
                "w => +document.querySelector('#width input').value === w",
                arg=WIDTH0 + 64 * k - 128 * (WIDTH0 + 64 * k) / 256,
                timeout=5_000,
            )
            wait_new_src(before)
            settle()
            shot(page, "flat")

            assert not errors, errors
            browser.close()
    finally:
        gr.close_all()
    assert all(p.stat().st_size > 0 for p in shots)
