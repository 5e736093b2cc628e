"""Radiology-style mouse and keyboard interaction for a server-rendered Gradio image.

The slice is rendered on the server into a ``gr.Image`` from three controls; this module adds, in the
browser only, the interaction a radiologist expects from a viewer. It is plain JavaScript and CSS with
no dependency (``static/viewer.js`` and ``static/viewer.css``, read with :mod:`importlib.resources`),
coupled to the page by ``elem_id`` alone:

=============  ==========================================================================================
``scan``       ``gr.Image(elem_id="scan", type="numpy", interactive=False)``: the rendered slice
``level``      ``gr.Number(elem_id="level")``: window level (centre)
``width``      ``gr.Number(elem_id="width")``: window width
``slice``      ``gr.Slider(elem_id="slice", step=1)``: slice index; may be hidden (``visible=False``) for 2D
=============  ==========================================================================================

Wiring (Gradio 6 takes ``head`` in ``launch``; ``gr.Blocks(head=...)`` still works there but warns)::

    from medtl_ui.viewer import VIEWER_HEAD, VIEWER_HELP

    with gr.Blocks() as demo:
        gr.Markdown(VIEWER_HELP)
        scan = gr.Image(elem_id="scan", type="numpy", interactive=False)
        level, width = gr.Number(40, elem_id="level"), gr.Number(400, elem_id="width")
        index = gr.Slider(0, n - 1, step=1, elem_id="slice")
        gr.on([level.change, width.change, index.change], render, [level, width, index], scan)
    demo.launch(head=VIEWER_HEAD)

What the page then does, over the image:

* **Left-drag: window/level.** Right widens the window, down raises the level (darker image), both by
  ``pixels * width / 256`` with the width taken when the drag starts; the width never goes below the
  ``#width`` input's ``minimum`` if that is > 0, else 1, and both respect the inputs' minimum/maximum.
  Values are rounded to a precision that suits the width (integers for CT-sized windows). The new
  values are typed into the ``#level``/``#width`` inputs with an ``input`` event, which is what Gradio 6's
  Number binds to: its value changes and its ``.change`` (and ``.input``) listeners run on the server.
  While dragging, the inputs are written at most every 100 ms, plus once on release, so the queue is
  not flooded (``.change`` defaults to ``trigger_mode="always_last"``, which also drops stale renders).
  If neither input exists (or they are not interactive), a left-drag pans instead.
* **Wheel: slices.** One wheel notch moves ``#slice`` by one step within its minimum/maximum (small
  trackpad deltas are added up first); the page does not scroll while the pointer is over the image.
  With no visible, interactive slider (a 2D image) the wheel is left to the page.
* **Ctrl+wheel (also a trackpad pinch) or ``+``/``-``: zoom** about the pointer (the centre for keys),
  1x to 16x, and **right-drag, middle-drag or Shift+left-drag: pan**. Both are a CSS transform of the
  ``<img>`` only (nothing goes to the server), clipped to the image frame, and kept across re-renders
  (new slice, new window); they reset when an image of another size arrives.
* **Double-click or ``r``: reset** zoom and pan.
* **Keyboard** while the image has focus (it is made focusable, ``tabindex=0``, and a press on it
  focuses it): ``ArrowUp``/``ArrowDown`` previous/next slice, ``PageUp``/``PageDown`` a tenth of the
  stack, ``Home``/``End`` first/last slice, ``+``/``-`` zoom, ``r`` reset.
* The image is fitted to its frame (``object-fit: contain``: a small image is scaled up, as viewers
  do; Gradio's own ``scale-down`` would show it at its pixel size).
* A caption on the image: ``W 400 L 40 · zoom 1.0× · slice 12/20`` (slice counted from 1).
* The browser's own image drag and context menu are suppressed on the image, and so is the click that
  ends a drag (an ``Image.select`` listener is not fired by a window/level drag).

Everything is attached by event delegation on ``document`` and refreshed by a ``MutationObserver``, so it
survives Gradio replacing the ``<img>`` or re-rendering the whole block. ``window.medtlViewer`` exposes
the view state and counters for tests and debugging.

Not done here: a ``#preset`` dropdown is *not* switched to "custom" from the page (choosing a Gradio
Dropdown option programmatically means driving its filter box and option list, and would fire the
dropdown's own ``.change``, which may write level/width back mid-drag). The app should do it on the
server: in the level/width handler, return ``gr.update(value="custom")`` for the preset when the values
no longer match the selected preset.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["VIEWER_HEAD", "VIEWER_HELP", "ELEM_IDS", "read_static"]

#: The elem_ids the viewer looks for (the only coupling with the app).
ELEM_IDS = {"image": "scan", "level": "level", "width": "width", "slice": "slice"}

VIEWER_HELP = (
    "**Viewer:** drag: window/level (→ wider, ↓ higher level) · wheel or ↑/↓: slices · "
    "Ctrl+wheel or +/−: zoom · right-drag or Shift+drag: pan · double-click or R: reset"
)


def read_static(name: str) -> str:
    """The text of one of the viewer's files in ``medtl_ui/static/`` (installed with the package)."""
    return (resources.files("medtl_ui") / "static" / name).read_text(encoding="utf-8")


#: Pass to ``demo.launch(head=VIEWER_HEAD)`` (Gradio 6; ``gr.Blocks(head=...)`` in Gradio 5): the viewer's
#: stylesheet (``static/viewer.css``) and scripts (``static/viewer.js``; ``static/login.js``, the sign-in form's
#: word for a locked-out client), inline.
VIEWER_HEAD = (
    f"<style>\n{read_static('viewer.css')}</style>\n<script>\n{read_static('viewer.js')}</script>\n"
    f"<script>\n{read_static('login.js')}</script>\n"
)
