"""Gradio app: upload a DICOM (file, several files or a zip of a series), NIfTI or PNG/JPEG; view it
with window presets and a slice slider; see the model's calibrated answer, where it looked, and
what the model is and is not for.

Safe defaults: bound to 127.0.0.1, no share link, no analytics, bounded upload size, uploads in a
private temporary folder removed on shutdown, a bounded queue, and no patient identifier or stack
trace ever reaches the page or the log. The app calls only the ``medtl`` API.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medtl import __version__
from medtl.config import CT_WINDOWS
from medtl.errors import MedtlError, MedtlInputError
from medtl.explain import METHODS, create_overlay
from medtl.inference import Predictor, load_run
from medtl.io import Scan, read_image_bounded

log = logging.getLogger("medtl.ui")

NOTICE = ("**Research software — not for diagnostic use.** Predictions come from a model trained on the data "
          "named below; read its model card before trusting any answer.")
MAX_FILE_SIZE = "200mb"
VIEW_PRESETS = ("auto", "file window", "brain", "lung", "mediastinum", "bone", "soft_tissue", "custom")
SHOWN_FIELDS = ("modality", "BodyPartExamined", "Manufacturer", "shape", "spacing_mm", "orientation", "units",
                "format")


def find_runs(path: str | Path) -> list[Path]:
    """A run folder itself, or the run folders (holding config.yaml + model.safetensors) inside it."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob("*/model.safetensors") if (p.parent / "config.yaml").is_file())
    if not runs:
        raise MedtlError(f"{path}: no medtl run found (a run folder holds config.yaml and model.safetensors)")
    return runs


def for_display(array: np.ndarray, min_side: int = 448, aspect: float = 1.0) -> np.ndarray:
    """Enlarge a small image for the page (nearest neighbour: no invented detail).

    ``aspect`` is row spacing / column spacing: rows are stretched so the image shows at its true
    physical proportions.
    """
    h, w = array.shape[:2]
    h_true = h * aspect
    scale = max(1.0, min_side / max(h_true, w))
    size = (max(1, round(w * scale)), max(1, round(h_true * scale)))
    if size == (w, h):
        return array
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.NEAREST))


# -- input ----------------------------------------------------------------------------------------

def prepare_upload(files, workdir: Path) -> Path | None:
    """One path for the upload: the file itself, or a private folder holding several files of a series."""
    if not files:
        return None
    files = [files] if isinstance(files, (str, Path)) else [f for f in files if f]
    if len(files) == 1:
        return Path(files[0])
    folder = Path(tempfile.mkdtemp(prefix="series-", dir=workdir))
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"{i:05d}_{Path(f).name}")
    return folder


def check_input(predictor: Predictor, scan: Scan, path: Path) -> str | None:
    """Why the model should not answer for this scan (the reason, in words), or None.

    Refused: a blank image; a colour image for a model trained on grey images only (or a grey one
    for a colour-only model); a modality or a dimensionality the model never saw in training.
    """
    a = scan.array
    finite = a[np.isfinite(a)]
    if finite.size == 0 or np.ptp(finite) == 0 or finite.std() < 1e-6 * max(1.0, abs(finite).max()):
        return "the image is blank (one value everywhere)"
    record = predictor.input_record or {}
    if scan.rgb is not None and not record.get("colour_inputs") and _is_colour_photo(scan.rgb):
        return "this is a colour image, and the model was trained on grey images only"
    if scan.rgb is None and record.get("colour_inputs") and record.get("grey_inputs") == 0:
        return "this is a grey image, and the model was trained on colour images only"
    seen = [m for m in record.get("modalities", []) if m not in ("UNKNOWN", "")]
    if seen and scan.modality and scan.modality.upper() not in seen:
        return f"the model was trained on {', '.join(seen)} images, and this is {scan.modality}"
    dims = record.get("dimensions", [])
    ndim = 3 if scan.is_volume else 2
    if dims and ndim not in dims:
        return (f"the model was trained on {'volumes' if 3 in dims else '2D images'} only, and this is a "
                f"{'volume' if ndim == 3 else '2D image'}")
    return None


def _is_colour_photo(rgb: np.ndarray) -> bool:
    """Whether an (…, 3) RGB image is clearly coloured (a tenth of its pixels saturated)."""
    rgb = np.asarray(rgb, np.float32)
    top = max(float(rgb.max(initial=0)), 1.0)
    saturation = (rgb.max(axis=-1) - rgb.min(axis=-1)) * (255.0 / top)
    return float(np.mean(saturation > 40)) > 0.1


# -- viewer ---------------------------------------------------------------------------------------

def window_slice(scan: Scan, index: int, preset: str, level: float | None = None,
                 width: float | None = None) -> np.ndarray:
    """One slice of a scan as uint8 for display, windowed by preset (or a free level/width); a colour
    scan is shown in colour, by its type's range (windows do not apply to colour)."""
    if scan.rgb is not None:
        rgb = scan.rgb[int(np.clip(index, 0, scan.rgb.shape[0] - 1))] if scan.is_volume else scan.rgb
        top = scan.value_max or max(float(rgb.max(initial=0)), 1.0)
        return (np.clip(rgb / top, 0, 1) * 255).astype(np.uint8)
    a = scan.array[int(np.clip(index, 0, scan.array.shape[0] - 1))] if scan.is_volume else \
        (scan.array if scan.array.ndim == 2 else scan.array[0])
    if preset == "custom" and width:
        lo, hi = level - width / 2, level + width / 2
    elif preset in CT_WINDOWS and scan.units == "HU":
        lv, wd = CT_WINDOWS[preset]
        lo, hi = lv - wd / 2, lv + wd / 2
    elif preset == "file window" and scan.window is not None:
        lo, hi = scan.window[0] - scan.window[1] / 2, scan.window[0] + scan.window[1] / 2
    else:  # auto: robust percentiles of the whole scan
        lo, hi = np.percentile(scan.array, [0.5, 99.5])
    out = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    return (out * 255).astype(np.uint8)


def header_summary(scan: Scan) -> dict:
    """The de-identified header fields the page shows."""
    s = scan.summary()
    out = {k: s[k] for k in SHOWN_FIELDS if k in s}
    if "series" in s:
        out["series"] = {k: s["series"][k] for k in ("series_number", "modality", "description", "slices")}
        out["series_choice"] = s.get("series_choice")
    return out


@dataclass
class Case:
    """Everything the page keeps about the current upload (in the user's session only)."""

    path: Path
    scan: Scan
    prediction: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # the model's view of the explained slice, [0, 1]
    saliency: np.ndarray | None = None
    slice_index: int = 0
    message: str = ""


def _aspect(scan: Scan) -> float:
    sp = scan.spacing[-2:]
    return float(sp[0] / sp[1]) if sp[1] > 0 else 1.0


def analyse(predictor: Predictor, file_path, method: str = "gradcam", alpha: float = 0.45,
            workdir: Path | None = None) -> tuple:
    """The page's main handler: (image, probabilities, overlay, message) for an upload.

    ``file_path``: a path, or a list of paths (several files of one series).
    """
    result = run_case(predictor, file_path, method, alpha, workdir)
    return result[:4]


def run_case(predictor: Predictor, file_path, method: str = "gradcam", alpha: float = 0.45,
             workdir: Path | None = None) -> tuple:
    """(image, probabilities, overlay, message, case) — the case is None when nothing could be shown."""
    workdir = workdir or Path(tempfile.gettempdir())
    path = prepare_upload(file_path, workdir)
    if path is None:
        return None, None, None, "Upload a DICOM (file, several files or a zip of a series), NIfTI or PNG/JPEG.", None
    name = path.name if path.is_file() else f"{len(list(path.iterdir()))} uploaded files"
    try:
        scan = read_image_bounded(path)  # in a child process bounded in memory and time
        reason = check_input(predictor, scan, path)
        if reason:
            log.info("refused upload: %s", reason)
            return None, None, None, f"**Not analysed** ({name}): {reason}. The model answers only for inputs " \
                "like those it was trained on.", None
        expl = predictor.explain(scan, method=method)
    except MedtlInputError as e:
        log.info("refused upload: %s", type(e).__name__)
        return None, None, None, f"**Cannot use this file** ({name}): {e.problem}" + (
            f" — expected {e.expected}." if e.expected else "."), None
    except Exception as e:  # never show a stack trace to the page
        log.error("analysis failed: %s", type(e).__name__)
        return None, None, None, f"**Analysis failed** for {name} ({type(e).__name__}). The file may be damaged.", None
    pred = expl.prediction
    calibrated = "calibrated " if predictor.temperature else ""
    where = f" Slice {pred.slice_index} shown (most suspicious)." if pred.slice_scores else ""
    op = predictor.operating_point
    if op and len(predictor.class_names) == 2:
        positive = predictor.class_names[1]
        p1 = pred.probabilities[positive]
        side = "at or above" if p1 >= op["threshold"] else "below"
        decision = (f"**Predicted class: {pred.label}** — {calibrated}probability of {positive} {p1:.2f}, {side} the "
                    f"model's operating threshold {op['threshold']:.2f} ({op['rule']}).")
    else:
        decision = f"**Predicted class: {pred.label}** ({calibrated}probability {pred.probabilities[pred.label]:.2f})."
    message = f"{decision}{where} Saliency: {expl.method} for class {expl.class_name}."
    case = Case(path=path, scan=scan, prediction=vars(pred), image=expl.image, saliency=expl.saliency,
                slice_index=int(pred.slice_index or 0), message=message)
    image = (np.clip(expl.image, 0, 1) * 255).astype(np.uint8)
    overlay = create_overlay(expl.image, expl.saliency, alpha)
    aspect = _aspect(scan)
    return for_display(image, aspect=aspect), pred.probabilities, for_display(overlay, aspect=aspect), message, case


def slice_profile(case: Case | None):
    """A plot (PNG array) of the per-slice score of a volume, or None for a 2D image."""
    if case is None or not case.prediction.get("slice_scores"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = case.prediction["slice_scores"]
    fig, ax = plt.subplots(figsize=(6, 2), dpi=100)
    ax.plot(range(len(scores)), scores, "-o", ms=3)
    ax.axvline(case.slice_index, color="tab:red", ls="--")
    ax.set(xlabel="slice", ylabel=f"p({case.prediction['label']})", ylim=(0, 1))
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def export_report(predictor: Predictor, case: Case | None, workdir: Path, alpha: float = 0.45) -> str | None:
    """A one-page PNG report of the case (image, overlay, probabilities, model, date); its path."""
    if case is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=110, gridspec_kw={"width_ratios": [1, 1, 0.9]})
    axes[0].imshow(case.image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("Image (model's view)")
    axes[1].imshow(create_overlay(case.image, case.saliency, alpha))
    axes[1].set_title("Saliency overlay")
    probs = case.prediction["probabilities"]
    axes[2].barh(list(probs), list(probs.values()), color="tab:blue")
    axes[2].set(xlim=(0, 1), title="Class probabilities")
    for a in axes[:2]:
        a.set_axis_off()
    text = (f"Decision: {case.prediction['label']}   Model: {predictor.run_dir.name} ({predictor.encoder}, "
            f"medtl {__version__})   Date: {datetime.date.today().isoformat()}\n"
            "Research software — not for diagnostic use.")
    fig.suptitle(text, fontsize=9)
    fig.tight_layout()
    out = Path(tempfile.mkdtemp(prefix="report-", dir=workdir)) / "medtl_case_report.png"
    fig.savefig(out)
    plt.close(fig)
    return str(out)


def _trust_panel(predictor: Predictor) -> str:
    """The model card and saliency sanity verdicts written by `medtl evaluate`, or why they are missing."""
    card = predictor.run_dir / "evaluation" / "model_card.md"
    text = card.read_text() if card.is_file() else \
        "_No model card: run `medtl evaluate` on this run to measure it (metrics with CIs, calibration)._"
    return text


def _sanity(predictor: Predictor) -> dict:
    ev = predictor.run_dir / "evaluation" / "evaluation.json"
    if not ev.is_file():
        return {}
    return {s["method"]: s["verdict"] for s in json.loads(ev.read_text()).get("saliency_sanity", [])}


def create_app(run: str | Path, workdir: Path | None = None, device: str = "auto"):
    """Build the Gradio Blocks app for a run folder (or a folder of runs); models run on ``device``."""
    import gradio as gr

    runs = find_runs(run)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="medtl-ui-"))
    cache: dict[str, Predictor] = {}

    def get(run_name: str) -> Predictor:
        if run_name not in cache:
            cache[run_name] = load_run(next(r for r in runs if r.name == run_name), device=device)
        return cache[run_name]

    first = runs[0].name
    get(first)
    examples = _examples()
    with gr.Blocks(title="medtl", analytics_enabled=False) as demo:
        case_state = gr.State(None)
        gr.Markdown("# medtl — scan classification with saliency")
        gr.Markdown(NOTICE)
        with gr.Row():
            model_choice = gr.Dropdown([r.name for r in runs], value=first, label="Model (run)",
                                       interactive=len(runs) > 1)
            model_info = gr.Markdown(_describe(get(first)))
        with gr.Row():
            upload = gr.File(label="Scan: DICOM (one file, several files or a .zip of a series), NIfTI or PNG/JPEG",
                             type="filepath", file_count="multiple")
            with gr.Column():
                method = gr.Dropdown(list(METHODS), value="gradcam", label="Saliency method")
                alpha = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Overlay opacity")
        if examples:
            gr.Examples([[[str(e)]] for e in examples], inputs=[upload], label="Examples from sample_data")
        message = gr.Markdown("Upload a scan.", elem_id="message")
        with gr.Row():
            with gr.Column():
                viewer = gr.Image(label="Viewer", type="numpy", elem_id="scan", interactive=False, height=420,
                                  buttons=["fullscreen"])
                with gr.Row():
                    slice_slider = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False)
                    preset = gr.Dropdown(list(VIEW_PRESETS), value="auto", label="Window")
                with gr.Row():
                    level = gr.Number(value=40, label="Level (custom)")
                    width = gr.Number(value=400, label="Width (custom)")
            with gr.Column():
                overlay = gr.Image(label="Saliency overlay (model's view)", type="numpy", elem_id="overlay",
                                   interactive=False, height=420, buttons=["fullscreen", "download"])
                sanity = gr.Markdown("", elem_id="sanity")
        probs = gr.Label(label="Class probabilities (the decision, at the operating point, is stated above)",
                         elem_id="probabilities", show_heading=False)
        profile = gr.Image(label="Per-slice score", type="numpy", interactive=False, visible=False)
        jump = gr.Button("Jump to the most suspicious slice", visible=False)
        header = gr.JSON(label="Header (de-identified)")
        with gr.Row():
            export = gr.Button("Export one-page report (PNG)")
            report_file = gr.File(label="Report", interactive=False)
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown(_trust_panel(get(first)))

        def on_upload(run_name, files, meth, a):
            predictor = get(run_name)
            image, p, ov, msg, case = run_case(predictor, files, meth, a, workdir)
            verdict = _sanity(predictor).get(meth, "")
            sanity_text = f"Sanity check of {meth}: {verdict}" if verdict else \
                f"No sanity check on record for {meth} (run `medtl evaluate`)."
            if case is None:
                return (None, p, None, msg, None, gr.update(visible=False), None, gr.update(visible=False),
                        gr.update(visible=False), "", *[gr.update(interactive=True)] * 3)
            n = case.scan.array.shape[0] if case.scan.is_volume else 1
            view = for_display(window_slice(case.scan, case.slice_index, "auto"), aspect=_aspect(case.scan))
            prof = slice_profile(case)
            return (view, p, ov, msg, case, gr.update(visible=n > 1, maximum=max(n - 1, 1), value=case.slice_index),
                    header_summary(case.scan), gr.update(value=prof, visible=prof is not None),
                    gr.update(visible=prof is not None), sanity_text,
                    gr.update(interactive=not case.scan.is_colour,  # no windowing for colour
                              info="windows do not apply to colour images" if case.scan.is_colour else None),
                    *[gr.update(interactive=not case.scan.is_colour)] * 2)

        def on_view(case, index, pre, lv, wd):
            if case is None:
                return None
            return for_display(window_slice(case.scan, index, pre, lv, wd), aspect=_aspect(case.scan))

        def on_alpha(case, a):
            if case is None:
                return None
            return for_display(create_overlay(case.image, case.saliency, a), aspect=_aspect(case.scan))

        outputs = [viewer, probs, overlay, message, case_state, slice_slider, header, profile, jump, sanity, preset,
                   level, width]
        upload.change(on_upload, [model_choice, upload, method, alpha], outputs, concurrency_limit=2)
        method.change(on_upload, [model_choice, upload, method, alpha], outputs, concurrency_limit=2)
        for control in (slice_slider, preset, level, width):
            control.change(on_view, [case_state, slice_slider, preset, level, width], viewer)
        alpha.change(on_alpha, [case_state, alpha], overlay)
        jump.click(lambda c: c.slice_index if c else 0, case_state, slice_slider)
        export.click(lambda run_name, c, a: export_report(get(run_name), c, workdir, a), [model_choice, case_state, alpha],
                     report_file)
        model_choice.change(lambda run_name: (_describe(get(run_name)), _trust_panel(get(run_name))), model_choice,
                            [model_info, card])
    demo.queue(max_size=16, default_concurrency_limit=max(1, (os.cpu_count() or 2) // 2))
    return demo


def _examples() -> list[Path]:
    root = Path(__file__).resolve().parents[1] / "sample_data"
    return [p for p in (root / "dicom" / "img_0003.dcm", root / "dicom" / "img_0001.dcm",
                        root / "nifti" / "vol_001.nii.gz") if p.is_file()]


def _describe(predictor: Predictor) -> str:
    rec = predictor.input_record or {}
    trained = f"; trained on {', '.join(rec.get('modalities', []))}" if rec.get("modalities") else ""
    calib = f"; calibrated (T = {predictor.temperature:.2f})" if predictor.temperature else "; not calibrated"
    return (f"Loaded **{predictor.run_dir.name}**: encoder `{predictor.encoder}`, classes "
            f"{', '.join(predictor.class_names)}, input {predictor.preprocessing.input_size} px{trained}{calib}")


def launch(run: str | Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           prevent_thread_lock: bool = False, max_file_size: str = MAX_FILE_SIZE, device: str = "auto"):
    """Serve the app with safe defaults (loopback, no share link, bounded uploads, private upload folder)."""
    credentials = None
    if auth:  # checked before anything is set up
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise MedtlError("--auth must be USER:PASS")
        credentials = (user, password)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    workdir = Path(tempfile.mkdtemp(prefix="medtl-ui-"))  # mode 0700: only this user reads the uploads
    os.environ["GRADIO_TEMP_DIR"] = str(workdir)
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    demo = create_app(run, workdir, device=device)
    return demo.launch(server_name=host, server_port=port, share=False, auth=credentials,
                       max_file_size=max_file_size, show_error=False, prevent_thread_lock=prevent_thread_lock,
                       footer_links=[], ssr_mode=False, allowed_paths=[])
