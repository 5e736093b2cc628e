"""Gradio app: upload a DICOM, NIfTI or PNG; see the image, the prediction and a Grad-CAM overlay.

Safe defaults: bound to 127.0.0.1, no share link, no analytics, bounded upload size and
queue, and no patient identifier or stack trace ever reaches the page.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medtl.errors import MedtlError, MedtlInputError
from medtl.inference import Predictor, load_run

log = logging.getLogger("medtl.ui")

NOTICE = "**Research software — not for diagnostic use.** Predictions come from a model trained on the data named below."
MAX_FILE_SIZE = "200mb"


def find_runs(path: str | Path) -> list[Path]:
    """A run folder itself, or the run folders (holding config.yaml + model.safetensors) inside it."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob("*/model.safetensors") if (p.parent / "config.yaml").is_file())
    if not runs:
        raise MedtlError(f"{path}: no medtl run found (a run folder holds config.yaml and model.safetensors)")
    return runs


def for_display(array: np.ndarray, min_side: int = 448) -> np.ndarray:
    """Enlarge a small image for the page (nearest neighbour: no invented detail)."""
    from PIL import Image

    h, w = array.shape[:2]
    scale = min_side / max(h, w)
    if scale <= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.NEAREST))


def analyse(predictor: Predictor, file_path: str | None) -> tuple:
    """The page's handler: (image, probabilities, overlay, message) for one uploaded file."""
    if not file_path:
        return None, None, None, "Upload a DICOM, NIfTI or PNG/JPEG file."
    name = Path(file_path).name
    try:
        expl = predictor.explain(file_path)
    except MedtlInputError as e:
        log.info("refused upload: %s", type(e).__name__)
        return None, None, None, f"**Cannot use this file** ({name}): {e.problem}" + (
            f" — expected {e.expected}." if e.expected else ".")
    except Exception as e:  # never show a stack trace to the page
        log.error("analysis failed: %s", type(e).__name__)
        return None, None, None, f"**Analysis failed** for {name} ({type(e).__name__}). The file may be damaged."
    pred = expl.prediction
    image = (np.clip(expl.image, 0, 1) * 255).astype(np.uint8)
    p = pred.probabilities[pred.label]
    calibrated = "calibrated " if predictor.temperature else ""
    rule = (f" Decision at the model's operating point ({predictor.operating_point['rule']})."
            if predictor.operating_point else "")
    where = f" Slice {pred.slice_index} shown (most suspicious)." if pred.slice_scores else ""
    message = (f"**Predicted class: {pred.label}** ({calibrated}probability {p:.2f}).{rule}{where} "
               f"Saliency: Grad-CAM for class {expl.class_name}.")
    return for_display(image), pred.probabilities, for_display(expl.overlay), message


def create_app(run: str | Path):
    """Build the Gradio Blocks app for a run folder (or a folder of runs)."""
    import gradio as gr

    runs = find_runs(run)
    cache: dict[str, Predictor] = {}

    def get(run_name: str) -> Predictor:
        if run_name not in cache:
            cache[run_name] = load_run(next(r for r in runs if r.name == run_name))
        return cache[run_name]

    first = runs[0].name
    get(first)
    with gr.Blocks(title="medtl", analytics_enabled=False) as demo:
        gr.Markdown("# medtl — scan classification with saliency")
        gr.Markdown(NOTICE)
        with gr.Row():
            model_choice = gr.Dropdown([r.name for r in runs], value=first, label="Model (run)",
                                       interactive=len(runs) > 1)
            model_info = gr.Markdown(_describe(get(first)))
        with gr.Row():
            upload = gr.File(label="Scan (DICOM, NIfTI, PNG/JPEG)", type="filepath")
        message = gr.Markdown("Upload a DICOM, NIfTI or PNG/JPEG file.", elem_id="message")
        with gr.Row():
            image = gr.Image(label="Image", type="numpy", elem_id="scan", interactive=False, height=420,
                             buttons=["fullscreen"])
            overlay = gr.Image(label="Saliency overlay (Grad-CAM)", type="numpy", elem_id="overlay",
                               interactive=False, height=420, buttons=["fullscreen", "download"])
        probs = gr.Label(label="Class probabilities", elem_id="probabilities")
        upload.change(lambda run_name, f: analyse(get(run_name), f), [model_choice, upload],
                      [image, probs, overlay, message], concurrency_limit=2)
        model_choice.change(lambda run_name: _describe(get(run_name)), model_choice, model_info)
    demo.queue(max_size=16, default_concurrency_limit=max(1, (os.cpu_count() or 2) // 2))
    return demo


def _describe(predictor: Predictor) -> str:
    return (f"Loaded **{predictor.run_dir.name}**: encoder `{predictor.encoder}`, classes "
            f"{', '.join(predictor.class_names)}, input {predictor.preprocessing.input_size} px")


def launch(run: str | Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           prevent_thread_lock: bool = False):
    """Serve the app with safe defaults (loopback, no share link, bounded uploads)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise MedtlError("--auth must be USER:PASS")
        credentials = (user, password)
    demo = create_app(run)
    return demo.launch(server_name=host, server_port=port, share=False, auth=credentials,
                       max_file_size=MAX_FILE_SIZE, show_error=False, prevent_thread_lock=prevent_thread_lock,
                       footer_links=[], ssr_mode=False)
