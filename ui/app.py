"""Gradio app: one case at a time. Upload a DICOM (file, several files of one series, or a zip of a
study), NIfTI or PNG/JPEG; read it in a viewer (window/level drag, zoom, pan, wheel through slices,
the saliency map on the slice); see the model's answer in plain words, or why it refuses to answer;
export a one-page report (PDF and PNG) under a case key that is not a patient identifier.

Safe defaults: bound to 127.0.0.1, no share link, no analytics, bounded upload size, uploads moved to
random names in a private folder (removed on exit, SIGTERM and SIGINT), failed logins locked out with a
growing delay, every file parsed in a bounded child process, and no patient identifier or stack trace
ever reaches the page or the log. The app calls only the ``medtl`` API.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medtl import __version__
from medtl.config import CT_WINDOWS
from medtl.errors import MedtlError, MedtlInputError
from medtl.explain import METHODS, create_overlay
from medtl.inference import Prediction, Predictor, load_run
from medtl.io import Scan, describe_path_bounded, read_image_bounded
from medtl.transforms import intensity_preset
from medtl_ui.safety import LoginThrottle, client_middleware, install_cleanup, looks_identifying, store_upload
from medtl_ui.viewer import VIEWER_HEAD, VIEWER_HELP

log = logging.getLogger("medtl.ui")

NOTICE = ("**Research software — not for diagnostic use.** The model answers only for images like those it "
          "was trained on, and says so when an image is not; read its model card before trusting any answer.")
MAX_FILE_SIZE = "200mb"
MODEL_WINDOW = "model's window"
SHOWN_FIELDS = ("modality", "BodyPartExamined", "Manufacturer", "shape", "spacing_mm", "orientation", "units",
                "format")
VOLUME_JUDGED = {  # how a volume reached a 2D model, in words (data.volume_mode)
    "middle": "its middle slice only", "mip": "a maximum-intensity projection of all its slices",
    "2.5d": "its middle slice with its two neighbours (2.5D)", "3d": "the whole volume (3D model)",
}


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


# -- the case -------------------------------------------------------------------------------------

@dataclass
class Case:
    """Everything the page keeps about the current case (in the user's session only)."""

    path: Path  # the stored upload (random name) or the private folder of its files
    scan: Scan
    key: str = ""  # case identifier: a hash of the uploaded bytes (not a patient identifier)
    files: list[str] = field(default_factory=list)  # names the page may show (identifying ones replaced)
    series: list[dict] = field(default_factory=list)  # the series of a multi-file upload (for the picker)
    series_uid: str | None = None  # the series shown, where there was a choice
    series_note: str = ""  # which series was used and why, in words
    prediction: dict = field(default_factory=dict)  # vars(Prediction)
    refused: str | None = None
    image: np.ndarray | None = None  # the model's view of the explained slice, [0, 1]
    saliency: np.ndarray | None = None
    method: str = "gradcam"
    slice_index: int = 0  # the slice the model judged (or scored highest); the middle one where it judged none
    judged_slice: bool = True  # False where the model judged no single slice (a projection, a 3D volume)
    series_chosen: bool = False  # the user picked the series (not the automatic rules)
    inputs: tuple | None = None  # the model's inputs and their parts, kept to draw more maps
    judged: str = ""  # what of the scan the model judged, in words
    message: str = ""
    maps: dict = field(default_factory=dict)  # (method, finding, slice) -> saliency map, computed on demand
    target: str | None = None  # the class (multi-label: the finding) the map explains; None: the model's default

    @property
    def n_slices(self) -> int:
        return int(self.scan.array.shape[0]) if self.scan.is_volume else 1


def case_key(paths: list[Path]) -> str:
    """A key that tells cases apart in reports without naming the patient: a hash of the files' bytes."""
    digests = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digests.append(h.hexdigest())
    return "case-" + hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:12]  # the files in any order


def store_case_files(files, workdir: Path) -> tuple[Path | None, list[str], str]:
    """(path to read, names the page may show, case key) for an upload: the files moved to random names in
    a private folder (one file: that file; several: their folder)."""
    Path(workdir).mkdir(mode=0o700, parents=True, exist_ok=True)
    stored = store_upload(files, workdir)
    if not stored:
        return None, [], ""
    path = stored[0].path if len(stored) == 1 else stored[0].path.parent
    return path, [s.display for s in stored], case_key([s.path for s in stored])


def series_options(series: list[dict]) -> list[tuple[str, str]]:
    """(label, series UID) for the series picker: one entry per series UID."""
    seen, options = set(), []
    for s in series:
        if s["series_uid"] in seen:
            continue
        seen.add(s["series_uid"])
        desc = f" · {s['description']}" if _shown_description(s.get("description")) else ""
        options.append((f"series {s['series_number']} · {s['modality']}{desc} · {s['slices']} slice(s) · "
                        f"{s['size'][0]}×{s['size'][1]}", s["series_uid"]))
    return options


def _shown_description(text) -> bool:
    """Whether a SeriesDescription may be shown: free text that may name the patient is left out."""
    return bool(text) and not looks_identifying(str(text))


def decision_text(predictor: Predictor, pred: Prediction) -> str:
    """The answer in words: the decision and its basis, honestly named."""
    calibrated = "calibrated " if predictor.temperature else ""
    if predictor.multi_label:
        thresholds = (predictor.operating_point or {}).get("thresholds") or [0.5] * len(predictor.class_names)
        basis = "thresholds chosen on validation data" if predictor.operating_point else \
            "0.5 (no thresholds were chosen for this model)"
        each = "; ".join(f"*{c}* {pred.probabilities[c]:.2f} {'≥' if pred.probabilities[c] >= t else '<'} {t:.2f}"
                         for c, t in zip(predictor.class_names, thresholds))
        found = ", ".join(pred.findings or []) or "none of the findings"
        return (f"**Findings: {found}** — each finding is judged on its own, its {calibrated}probability against its "
                f"threshold ({basis}): {each}.")
    if pred.decision == "operating point" and predictor.operating_point and len(predictor.class_names) == 2:
        positive = predictor.class_names[1]
        p1 = pred.probabilities[positive]
        op = predictor.operating_point
        side = "at or above" if p1 >= op["threshold"] else "below"
        digits = 2
        while digits < 6 and f"{p1:.{digits}f}" == f"{op['threshold']:.{digits}f}":
            digits += 1  # never "0.52, below the threshold 0.52"
        return (f"**Predicted class: {pred.label}** — the {calibrated}probability of *{positive}* is {p1:.{digits}f}, "
                f"{side} the decision threshold {op['threshold']:.{digits}f} chosen on validation data ({op['rule']}).")
    return (f"**Predicted class: {pred.label}** — the most probable class ({calibrated}probability "
            f"{pred.probabilities[pred.label]:.2f}). No decision threshold was chosen for this model: this is the "
            "class with the highest probability, not a decision at a chosen operating point.")


def judged_text(predictor: Predictor, case: Case) -> str:
    """What of the scan the model judged, in words."""
    if not case.scan.is_volume:
        return ""
    mode = predictor.config.data.volume_mode
    n = case.n_slices
    if case.prediction.get("slice_scores"):
        return (f"Every slice of this volume was scored ({n} slices; the study's probability is the "
                f"{predictor.config.data.slice_aggregation} of the slices'); slice {case.slice_index + 1} scores highest.")
    if not case.judged_slice:
        return f"This volume of {n} slices was judged on {VOLUME_JUDGED.get(mode, mode)}, not on one slice."
    return f"This volume of {n} slices was judged on {VOLUME_JUDGED.get(mode, mode)}: slice {case.slice_index + 1}."


def open_case(predictor: Predictor, path: Path, method: str = "gradcam", series_uid: str | None = None,
              files: list[str] | None = None, key: str = "") -> tuple[Case | None, str]:
    """Read, judge and explain one case; (case, message). The case is None when the file cannot be read."""
    files = files or [path.name]
    name = files[0] if len(files) == 1 else f"{len(files)} files"
    series, note = [], ""
    try:
        if path.is_dir() or path.suffix.lower() == ".zip":
            # the series, from their headers (an unusable listing: the read below says why)
            series = describe_path_bounded(path, decode=False).get("series", [])
        scan = read_image_bounded(path, series_uid=series_uid) if series_uid else read_image_bounded(path)
        if series:
            used = scan.header.get("series", {})
            studies = {s.get("study_key") for s in series if s.get("study_key")}
            note = (f"Series {used.get('series_number')} ({used.get('modality')}"
                    f"{', ' + used['description'] if _shown_description(used.get('description')) else ''}, "
                    f"{used.get('slices')} slices) is shown: "
                    f"{'chosen by you' if series_uid else scan.header.get('series_choice', '')}.")
            if len(series_options(series)) > 1:
                note += f" The upload holds {len(series_options(series))} series: pick another below."
            if len(studies) > 1:
                note += (f" **These files come from {len(studies)} different studies**: only the series shown is "
                         "analysed. Upload one study at a time.")
        pred = predictor.predict(scan)
    except MedtlInputError as e:
        log.info("refused upload: %s", type(e).__name__)
        return None, f"**Cannot use this file** ({name}): {e.problem}" + (
            f" — expected {e.expected}." if e.expected else ".")
    except Exception as e:  # never show a stack trace to the page
        log.error("analysis failed: %s", type(e).__name__)
        return None, f"**Analysis failed** for {name} ({type(e).__name__}). The file may be damaged."
    if not scan.modality and scan.rgb is None and read_as(predictor, scan):
        note = (note + " " if note else "") + (f"The file does not name its modality: read as "
                                               f"{read_as(predictor, scan)}, the modality the model was trained on.")
    case = Case(path=path, scan=scan, key=key, files=files, series=series, series_uid=series_uid or
                scan.header.get("series", {}).get("series_uid"), series_note=note, prediction=vars(pred),
                refused=pred.refused, method=method, slice_index=int(pred.slice_index or 0),
                judged_slice=pred.slice_index is not None or not scan.is_volume, series_chosen=bool(series_uid))
    if not case.judged_slice:
        case.slice_index = case.n_slices // 2
    if pred.refused:
        log.info("refused upload: %s", pred.refused.split(",")[0])
        case.slice_index = case.n_slices // 2
        case.message = (f"**Not analysed** ({name}): {pred.refused}. The model answers only for images like those "
                        "it was trained on.")
        return case, case.message
    explain_case(predictor, case, method)
    case.judged = judged_text(predictor, case)
    case.message = " ".join(x for x in (decision_text(predictor, pred), case.judged, empty_map_text(case)) if x)
    return case, case.message


def explain_case(predictor: Predictor, case: Case, method: str) -> None:
    """Compute the saliency map of ``method`` for the case's prediction (the prediction is reused)."""
    pred = Prediction(**case.prediction)
    case.method = method
    try:
        if case.inputs is None:
            case.inputs = predictor.inputs(case.scan)
        expl = predictor.saliency(case.scan, pred, class_name=case.target, method=method,
                                  prepared=(*case.inputs, None))
    except Exception as e:  # a 3D model, or a map that fails: no map, and the answer stands
        log.info("no saliency map: %s", type(e).__name__)
        case.image = case.saliency = None
        return
    case.image, case.saliency = expl.image, expl.saliency
    _keep_map(case, (method, case.target, case.slice_index), expl.saliency)


MAX_MAPS = 64  # saliency maps kept per case (slices × methods); the oldest go first


def _keep_map(case: Case, key: tuple, saliency: np.ndarray) -> None:
    case.maps[key] = saliency
    while len(case.maps) > MAX_MAPS:
        case.maps.pop(next(iter(case.maps)))


def empty_map_text(case: Case) -> str:
    """A word when the saliency map is empty (no region raised the score), rather than a plain picture."""
    if case.image is None:
        return "No saliency map: maps are drawn for 2D models only."
    if case.saliency is None or np.any(case.saliency > 0.01):
        return ""
    target = case.target or case.prediction["label"]
    return (f"The {case.method} map is empty for this case (no region raised the score of {target}): "
            "try another saliency method.")


def slice_map(predictor: Predictor, case: Case, index: int) -> np.ndarray | None:
    """The saliency map of slice ``index`` (computed once, then kept), or None where the model did not judge
    that slice on its own (a volume judged on its middle slice or a projection)."""
    if case.saliency is None or not case.judged_slice:
        return None
    if (case.method, case.target, index) in case.maps:
        return case.maps[(case.method, case.target, index)]
    if not case.scan.is_volume or not case.prediction.get("slice_scores"):
        return case.saliency if index == case.slice_index or not case.scan.is_volume else None
    pred = Prediction(**case.prediction)
    case.inputs = case.inputs or predictor.inputs(case.scan)
    expl = predictor.saliency(case.scan, pred, class_name=case.target, method=case.method, slice_index=index,
                              prepared=(*case.inputs, None))
    _keep_map(case, (case.method, case.target, index), expl.saliency)
    return expl.saliency


def run_case(predictor: Predictor, file_path, method: str = "gradcam", alpha: float = 0.45,
             workdir: Path | None = None) -> tuple:
    """(image, probabilities, overlay, message, case) for an upload (a path or a list of paths); the
    files are moved to random names under ``workdir``. The case is None when nothing could be read."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="medtl-ui-"))
    if not file_path:
        return None, None, None, "Upload a DICOM (file, several files of one series or a .zip of a study), NIfTI or " \
            "PNG/JPEG.", None
    path, files, key = store_case_files(file_path, workdir)
    case, message = open_case(predictor, path, method, files=files, key=key)
    if case is None or case.refused:
        return None, None, None, message, case
    if case.image is None:  # answered without a map (a 3D model)
        return None, case.prediction["probabilities"], None, message, case
    aspect = _aspect(case.scan)
    image = (np.clip(case.image, 0, 1) * 255).astype(np.uint8)
    overlay = create_overlay(case.image, case.saliency, alpha)
    return (for_display(image, aspect=aspect), case.prediction["probabilities"], for_display(overlay, aspect=aspect),
            message, case)


def analyse(predictor: Predictor, file_path, method: str = "gradcam", alpha: float = 0.45,
            workdir: Path | None = None) -> tuple:
    """(image, probabilities, overlay, message) for an upload (see :func:`run_case`)."""
    return run_case(predictor, file_path, method, alpha, workdir)[:4]


# -- viewer ---------------------------------------------------------------------------------------

def read_as(predictor: Predictor, scan: Scan) -> str:
    """The modality the model reads ``scan`` as: its own, or (a NIfTI or a picture that names none) the one
    modality the model was trained on (as :class:`~medtl.inference.Predictor` does)."""
    if scan.modality:
        return scan.modality.upper()
    seen = [m for m in (predictor.input_record or {}).get("modalities", []) if m not in ("UNKNOWN", "")]
    return seen[0] if len(seen) == 1 else ""


def window_presets(predictor: Predictor, scan: Scan) -> tuple[list[str], str]:
    """(window presets that apply to this scan, why others are missing); the first is the model's own."""
    if scan.rgb is not None:
        return [], "windows do not apply to colour images"
    choices, why = [MODEL_WINDOW], ""
    if scan.window is not None:
        choices.append("file window")
    if scan.units == "HU" or read_as(predictor, scan) == "CT":
        choices += list(CT_WINDOWS)
    else:
        why = "CT presets need Hounsfield units; this image has none"
    return choices + ["full range", "custom"], why


def preset_window(predictor: Predictor, scan: Scan, preset: str) -> tuple[float, float]:
    """(level, width) of a preset. The model's window is the intensity scaling the model's inputs get
    (:func:`medtl.transforms.intensity_preset`): its CT window (the first of a multi-window stack), the
    file's own window, the type's full range, or the data's percentiles."""
    data = predictor.config.data
    if preset == MODEL_WINDOW:
        how = intensity_preset(scan, read_as(predictor, scan), data)
        if how == "ct_window":
            return CT_WINDOWS[data.ct_multi_windows[0] if data.ct_window == "multi" else data.ct_window]
        if how == "file_window" and scan.window is not None:
            return scan.window
        if how == "dtype" and scan.value_max:
            return float(scan.value_max) / 2, float(scan.value_max)
        lo, hi = np.percentile(scan.array, data.percentiles)
    elif preset in CT_WINDOWS:
        return CT_WINDOWS[preset]
    elif preset == "file window" and scan.window is not None:
        return scan.window
    else:
        lo, hi = float(np.nanmin(scan.array)), float(np.nanmax(scan.array))
    return float((lo + hi) / 2), float(max(hi - lo, 1e-6))


def window_slice(scan: Scan, index: int, level: float, width: float) -> np.ndarray:
    """One slice of a scan as uint8 for display, windowed by ``level``/``width``; a colour scan is shown in
    colour, by its type's range (windows do not apply to colour)."""
    if scan.rgb is not None:
        rgb = scan.rgb[int(np.clip(index, 0, scan.rgb.shape[0] - 1))] if scan.is_volume else scan.rgb
        top = scan.value_max or max(float(rgb.max(initial=0)), 1.0)
        return (np.clip(rgb / top, 0, 1) * 255).astype(np.uint8)
    a = scan.array[int(np.clip(index, 0, scan.array.shape[0] - 1))] if scan.is_volume else \
        (scan.array if scan.array.ndim == 2 else scan.array[0])
    lo, hi = level - width / 2, level + width / 2
    out = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    return (out * 255).astype(np.uint8)


def render_view(predictor: Predictor, case: Case | None, index: int, level: float, width: float, show_map: bool,
                alpha: float) -> tuple[np.ndarray | None, str]:
    """(viewer image, caption): the windowed slice, with the saliency map on it where the model judged it."""
    if case is None:
        return None, ""
    index = int(np.clip(index or 0, 0, case.n_slices - 1))
    view = window_slice(case.scan, index, float(level or 0), float(width or 1))
    caption = f"Slice {index + 1} of {case.n_slices}." if case.scan.is_volume else ""
    if show_map and not case.refused:
        sal = None
        try:
            sal = slice_map(predictor, case, index)
        except MedtlError:
            sal = None
        if sal is None and case.image is None:
            caption += " No saliency map for this model."
        elif sal is None and not case.judged_slice:
            caption += " The model judged the volume as a whole: its map is on the model's view, not on a slice."
        elif sal is None:
            caption += f" The model judged slice {case.slice_index + 1} only: no map on this slice."
        else:
            if sal.shape != view.shape[:2]:
                sal = np.asarray(Image.fromarray(sal.astype(np.float32)).resize(view.shape[1::-1], Image.BILINEAR))
            view = create_overlay(view / 255.0, sal, alpha)
            caption += f" {case.method} map on this slice." if np.any(sal > 0.01) else \
                f" The {case.method} map is empty here (no region raised the score): try another method."
    return for_display(view, aspect=_aspect(case.scan)), caption.strip()


def header_summary(scan: Scan) -> dict:
    """The de-identified header fields the page shows."""
    s = scan.summary()
    out = {k: s[k] for k in SHOWN_FIELDS if k in s}
    if "series" in s:
        out["series"] = {k: s["series"][k] for k in ("series_number", "modality", "description", "slices")}
        out["series_choice"] = s.get("series_choice")
    return out


def _aspect(scan: Scan) -> float:
    sp = scan.spacing[-2:]
    return float(sp[0] / sp[1]) if sp[1] > 0 else 1.0


def slice_profile(case: Case | None):
    """A plot (PNG array) of the per-slice score of a volume, or None for a 2D image."""
    if case is None or not case.prediction.get("slice_scores"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = case.prediction["slice_scores"]
    fig, ax = plt.subplots(figsize=(6, 2), dpi=100)
    ax.plot(range(1, len(scores) + 1), scores, "-o", ms=3)
    ax.axvline(case.slice_index + 1, color="tab:red", ls="--")
    ax.set(xlabel="slice", ylabel=f"p({case.prediction['label']})", ylim=(0, 1))
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


# -- report ---------------------------------------------------------------------------------------

def model_version(predictor: Predictor) -> str:
    """The run's name and the first 12 hex of its weights' sha256: which model, exactly."""
    h = hashlib.sha256((predictor.run_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    return f"{predictor.run_dir.name} ({predictor.encoder}, weights sha256 {h}; medtl {__version__})"


def export_report(predictor: Predictor, case: Case | None, workdir: Path, alpha: float = 0.45) -> list[str]:
    """A one-page report of the case as PDF and PNG: case key (not a patient identifier), model and
    version, date, probabilities, decision and its basis, what was judged, the overlay and the notice."""
    if case is None or case.refused or case.image is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    fig = plt.figure(figsize=(8.27, 11.69), dpi=100)  # A4 portrait
    fig.text(0.06, 0.96, "medtl — case report", fontsize=16, weight="bold")
    fig.text(0.06, 0.935, "Research software — not for diagnostic use.", fontsize=10, color="tab:red")
    pred = case.prediction
    probs = pred["probabilities"]
    op = predictor.operating_point if pred.get("decision") == "operating point" else None
    thresholds = (predictor.operating_point or {}).get("thresholds") if predictor.multi_label else None
    if predictor.multi_label:
        basis = "each finding's probability against its threshold: " + "; ".join(
            f"{c} {probs[c]:.3f} {'≥' if probs[c] >= t else '<'} {t:.3f}" for c, t in zip(
                predictor.class_names, thresholds or [0.5] * len(predictor.class_names))) + (
            " (thresholds chosen on validation data)" if thresholds else " (0.5: no thresholds were chosen)")
    elif op:
        p1 = probs[predictor.class_names[1]]
        basis = (f"probability of {predictor.class_names[1]} {p1:.3f} {'≥' if p1 >= op['threshold'] else '<'} "
                 f"threshold {op['threshold']:.3f} chosen on validation data ({op['rule']})")
    else:
        basis = "most probable class (no decision threshold was chosen for this model)"
    lines = [("Case", f"{case.key}  (a hash of the uploaded files; not a patient identifier)"),
             ("Date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
             ("Model", model_version(predictor)),
             ("Input", f"{len(case.files)} file(s): {case.scan.modality or case.scan.source.upper()} "
                       f"{'volume' if case.scan.is_volume else 'image'} of shape {list(case.scan.array.shape)}"),
             ("Decision", str(pred["label"])), ("Basis", basis),
             ("Probabilities", ("calibrated on validation data" if predictor.temperature else "not calibrated")),
             ("Judged", case.judged or "the whole 2D image"),
             ("Saliency", f"{case.method}" + (f" of {case.target or predictor.default_target(Prediction(**pred))}"
                                              if predictor.multi_label else "") + ": where the model looked, not a finding")]
    y = 0.90
    for k, v in lines:
        fig.text(0.06, y, k, fontsize=9, weight="bold")
        wrapped = textwrap.wrap(v, 95) or [""]
        for line in wrapped:
            fig.text(0.22, y, line, fontsize=9)
            y -= 0.017
        y -= 0.008
    top = min(0.66, y - 0.035)  # the images start below the text, however many lines it took
    ax = fig.add_axes((0.06, top - 0.3, 0.42, 0.3))
    ax.imshow(case.image, cmap=None if case.image.ndim == 3 else "gray", vmin=0, vmax=1)
    ax.set_title("Model's view", fontsize=9)
    ax.set_axis_off()
    ax = fig.add_axes((0.52, top - 0.3, 0.42, 0.3))
    ax.imshow(create_overlay(case.image, case.saliency, alpha))
    ax.set_title(f"Saliency ({case.method})", fontsize=9)
    ax.set_axis_off()
    ax = fig.add_axes((0.3, 0.1, 0.6, min(0.18, top - 0.45)))
    names = list(probs)
    ax.barh(names, [probs[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(0.98, i, f"{probs[n]:.3f}", va="center", ha="right", fontsize=9)
    for i, t in enumerate(thresholds or []):
        ax.vlines(t, i - 0.45, i + 0.45, color="tab:red", ls="--", lw=1.5, label="decision threshold" if not i else None)
    if thresholds:
        ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.0, 1.02))
    if op:
        i = names.index(predictor.class_names[1])
        ax.vlines(op["threshold"], i - 0.45, i + 0.45, color="tab:red", ls="--", lw=1.5,
                  label=f"decision threshold on {predictor.class_names[1]}")
        ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.0, 1.02))
    ax.set(xlim=(0, 1), title="Probability of each finding" if predictor.multi_label else "Class probabilities")
    fig.text(0.06, 0.04, "Generated by medtl from a model trained on the data named in its model card. The decision "
             "is the model's, not a diagnosis.", fontsize=7, color="0.4")
    folder = Path(tempfile.mkdtemp(prefix="report-", dir=workdir))
    pdf, png = folder / f"medtl_report_{case.key}.pdf", folder / f"medtl_report_{case.key}.png"
    with PdfPages(pdf, metadata={"Title": f"medtl case report {case.key}", "Creator": f"medtl {__version__}"}) as doc:
        doc.savefig(fig)
    fig.savefig(png)
    plt.close(fig)
    return [str(pdf), str(png)]


# -- panels ---------------------------------------------------------------------------------------

def _trust_panel(predictor: Predictor) -> str:
    """The model card written by `medtl evaluate`, or what is known without it, in a clinician's words."""
    card = predictor.run_dir / "evaluation" / "model_card.md"
    if card.is_file():
        return card.read_text()
    metrics = predictor.run_dir / "metrics.json"
    m = json.loads(metrics.read_text()) if metrics.is_file() else {}
    auc = (m.get("test") or {}).get("auc")
    known = f" On the patients held out when it was trained, its AUC was {auc:.2f}." if auc is not None else ""
    return ("_This model has not been through a full evaluation (confidence intervals, calibration check, "
            f"saliency checks), so how far to trust it is not documented.{known} Ask whoever trained it for its "
            "evaluation report._")


def _sanity_text(predictor: Predictor, method: str) -> str:
    ev = predictor.run_dir / "evaluation" / "evaluation.json"
    verdicts = {s["method"]: s["verdict"] for s in json.loads(ev.read_text()).get("saliency_sanity", [])} \
        if ev.is_file() else {}
    if method in verdicts:
        return f"Check of the {method} map: {verdicts[method]}"
    return (f"The {method} map has not been checked for this model (a check that the map depends on what the "
            "model learnt): read it with care.")


def _describe(predictor: Predictor) -> str:
    rec = predictor.input_record or {}
    trained = f"; trained on {', '.join(rec['modalities'])} images" if rec.get("modalities") else ""
    calib = "probabilities calibrated on validation data" if predictor.temperature else "probabilities not calibrated"
    decision = ("a decision threshold chosen on validation data" if predictor.operating_point else
                "no decision threshold (the most probable class is shown)")
    if predictor.multi_label:
        decision = ("several findings per image, each decided at its own threshold chosen on validation data"
                    if predictor.operating_point else "several findings per image, each decided at 0.5")
    refuses = "refuses images unlike its training images" if predictor.ood else \
        "checks only modality, dimensions and colour of an image (no content check)"
    kind = "findings" if predictor.multi_label else "classes"
    return (f"Model **{predictor.run_dir.name}**: {kind} {', '.join(predictor.class_names)}{trained}; {calib}; "
            f"{decision}; {refuses}.")


def _probability_label(predictor: Predictor) -> str:
    what = "Probability of each finding, judged on its own" if predictor.multi_label else "Class probabilities"
    return what + " (" + ("calibrated on validation data" if predictor.temperature else
                                      "not calibrated") + ")"


# -- the page -------------------------------------------------------------------------------------

def create_app(run: str | Path, workdir: Path | None = None, device: str = "auto"):
    """Build the Gradio Blocks app for a run folder (or a folder of runs); models run on ``device``."""
    import gradio as gr

    runs = find_runs(run)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="medtl-ui-"))
    cache: dict[str, Predictor] = {}

    def get(run_name: str) -> Predictor:
        if run_name not in cache:
            cache[run_name] = load_run(next(r for r in runs if r.name == run_name), device=device, bounded=True)
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
            model_info = gr.Markdown(_describe(get(first)), elem_id="model-info")
        with gr.Row():
            upload = gr.File(label="New case: a DICOM file, several files of one series, a .zip of a study, a NIfTI "
                             "or a PNG/JPEG", type="filepath", file_count="multiple", elem_id="upload")
            with gr.Column():
                method = gr.Dropdown(list(METHODS), value="gradcam", label="Saliency method")
                finding_pick = gr.Dropdown([], label="Saliency map of the finding", visible=False, elem_id="finding")
                alpha = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Overlay opacity")
                show_map = gr.Checkbox(value=True, label="Show the saliency map on the viewer")
        case_info = gr.Markdown("", elem_id="case")
        series_pick = gr.Dropdown([], label="Series", visible=False, elem_id="series")
        message = gr.Markdown("Upload a scan to start a case.", elem_id="message")
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown(VIEWER_HELP)
                viewer = gr.Image(label="Viewer", type="numpy", elem_id="scan", interactive=False, height=480,
                                  buttons=["fullscreen"])
                caption = gr.Markdown("", elem_id="view-caption")
                # the server checks values against the maximum it was built with, not the case's: a wide one
                slice_slider = gr.Slider(0, 4096, value=0, step=1, label="Slice", visible=False, elem_id="slice")
                with gr.Row():
                    preset = gr.Dropdown([MODEL_WINDOW, "custom"], value=MODEL_WINDOW, label="Window", elem_id="preset")
                    level = gr.Number(value=40, label="Level", elem_id="level")
                    width = gr.Number(value=400, label="Width", minimum=1e-6, elem_id="width")
            with gr.Column(scale=2):
                probs = gr.Label(label=_probability_label(get(first)), elem_id="probabilities", show_heading=False)
                overlay = gr.Image(label="Model's view with its saliency map", type="numpy", elem_id="overlay",
                                   interactive=False, height=300, buttons=["fullscreen", "download"])
                sanity = gr.Markdown("", elem_id="sanity")
                profile = gr.Image(label="Score of each slice", type="numpy", interactive=False, visible=False)
                jump = gr.Button("Go to the slice the model judged", visible=False)
        header = gr.JSON(label="Header (de-identified)")
        with gr.Row():
            export = gr.Button("Export one-page report (PDF and PNG)", elem_id="export", interactive=False)
            report_file = gr.File(label="Report (Export creates it)", interactive=False, file_count="multiple",
                                  elem_id="report")
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown(_trust_panel(get(first)))

        outputs = [viewer, probs, overlay, message, case_state, slice_slider, header, profile, jump, sanity, preset,
                   level, width, case_info, series_pick, report_file, caption, upload, export, finding_pick]

        def show(predictor: Predictor, case: Case | None, msg: str, a: float, meth: str, keep_upload=None):
            """Every output of the page for a new case (or for none): nothing of the previous case survives."""
            upload_value = gr.update(value=keep_upload)
            if case is None:
                return (None, gr.update(value=None, label=_probability_label(predictor)), None, msg, None,
                        gr.update(visible=False, value=0), None,
                        gr.update(value=None, visible=False), gr.update(visible=False), "",
                        gr.update(choices=[MODEL_WINDOW, "custom"], value=MODEL_WINDOW, interactive=True), 40, 400, "",
                        gr.update(choices=[], value=None, visible=False), None, "", upload_value,
                        gr.update(interactive=False), gr.update(choices=[], value=None, visible=False))
            names = ", ".join(case.files[:5]) + (f" and {len(case.files) - 5} more" if len(case.files) > 5 else "")
            info = f"**Case {case.key}** — {names}. {case.series_note}".strip()
            options = series_options(case.series)
            choices, why = window_presets(predictor, case.scan)
            colour = case.scan.rgb is not None
            lv, wd = preset_window(predictor, case.scan, MODEL_WINDOW) if not colour else (128.0, 256.0)
            view, cap = render_view(predictor, case, case.slice_index, lv, wd, True, a)
            refused = case.refused is not None
            prof = None if refused else slice_profile(case)
            ov = None if refused or case.image is None else \
                for_display(create_overlay(case.image, case.saliency, a), aspect=_aspect(case.scan))
            answer = gr.update(value=None, label="Class probabilities: none, the image was not analysed") if refused \
                else gr.update(value=case.prediction["probabilities"], label=_probability_label(predictor))
            return (view, answer, ov, msg, case,
                    gr.update(visible=case.n_slices > 1, maximum=max(case.n_slices - 1, 1), value=case.slice_index),
                    header_summary(case.scan), gr.update(value=prof, visible=prof is not None),
                    gr.update(visible=case.scan.is_volume and case.judged_slice and not refused),
                    "" if refused or case.image is None else _sanity_text(predictor, meth),
                    gr.update(choices=choices or [MODEL_WINDOW, "custom"], value=MODEL_WINDOW, interactive=not colour,
                              info=why or None),
                    gr.update(value=round(lv, 2), interactive=not colour), gr.update(value=round(wd, 2), interactive=not colour),
                    info, gr.update(choices=options, value=case.series_uid, visible=len(options) > 1), None, cap,
                    upload_value, gr.update(interactive=not refused and case.image is not None),
                    gr.update(choices=predictor.class_names, visible=predictor.multi_label and not refused and
                              case.image is not None, value=case.target or predictor.default_target(
                                  Prediction(**case.prediction)) if predictor.multi_label and not refused else None))

        def on_upload(run_name, files, meth, a):
            predictor = get(run_name)
            if not files:
                return show(predictor, None, "Upload a scan to start a case.", a, meth)
            try:
                path, names, key = store_case_files(files, workdir)
            except (OSError, ValueError) as e:
                log.info("upload not stored: %s", type(e).__name__)
                return show(predictor, None, "**Cannot use this upload**: it is not a regular file.", a, meth)
            case, msg = open_case(predictor, path, meth, files=names, key=key)
            return show(predictor, case, msg, a, meth)

        def on_series(run_name, case, uid, meth, a):
            if case is None or not uid or uid == case.series_uid:
                return [gr.update()] * len(outputs)
            predictor = get(run_name)
            new, msg = open_case(predictor, case.path, meth, series_uid=uid, files=case.files, key=case.key)
            if new is None:  # that series cannot be used: keep the one shown, and say why
                return show(predictor, case, f"{msg} The series shown before is kept.", a, meth)
            new.series = case.series
            return show(predictor, new, msg, a, meth)

        def on_model(run_name, case, meth, a):
            predictor = get(run_name)
            head = (_describe(predictor), _trust_panel(predictor))
            if case is None:
                return (*head, *show(predictor, None, "Upload a scan to start a case.", a, meth))
            new, msg = open_case(predictor, case.path, meth, series_uid=case.series_uid if case.series_chosen else None,
                                 files=case.files, key=case.key)
            return (*head, *show(predictor, new, msg, a, meth))

        def on_method(run_name, case, meth, a, index, lv, wd, show_m, finding=None):
            """Only the map is recomputed: the prediction is kept."""
            predictor = get(run_name)
            if case is None or case.refused or case.image is None:
                return None, case, "", gr.update(), ""
            if finding and finding in predictor.class_names:
                case.target = finding
            explain_case(predictor, case, meth)
            if case.image is None:
                return None, case, "", gr.update(), ""
            ov = for_display(create_overlay(case.image, case.saliency, a), aspect=_aspect(case.scan))
            view, cap = render_view(predictor, case, index, lv, wd, show_m, a)
            return ov, case, _sanity_text(predictor, meth), view, cap

        def on_finding(run_name, case, finding, meth, a, index, lv, wd, show_m):
            """Multi-label: the map of another finding (the prediction is kept)."""
            return on_method(run_name, case, meth, a, index, lv, wd, show_m, finding)

        def on_view(run_name, case, index, lv, wd, show_m, a):
            return render_view(get(run_name), case, index, lv, wd, show_m, a)

        def on_preset(run_name, case, pre):
            if case is None or pre == "custom" or pre not in window_presets(get(run_name), case.scan)[0]:
                return gr.update(), gr.update()
            lv, wd = preset_window(get(run_name), case.scan, pre)
            return round(lv, 2), round(wd, 2)

        def on_alpha(case, a):
            if case is None or case.refused or case.image is None:
                return None
            return for_display(create_overlay(case.image, case.saliency, a), aspect=_aspect(case.scan))

        upload.upload(on_upload, [model_choice, upload, method, alpha], outputs, concurrency_limit=2, api_name="on_upload")
        upload.clear(on_upload, [model_choice, upload, method, alpha], outputs, api_name="on_clear")
        series_pick.input(on_series, [model_choice, case_state, series_pick, method, alpha], outputs,
                          concurrency_limit=2, api_name="on_series")
        model_choice.change(on_model, [model_choice, case_state, method, alpha], [model_info, card, *outputs],
                            concurrency_limit=2, api_name="on_model")
        method.change(on_method, [model_choice, case_state, method, alpha, slice_slider, level, width, show_map],
                      [overlay, case_state, sanity, viewer, caption], concurrency_limit=2, api_name="on_method")
        finding_pick.input(on_finding, [model_choice, case_state, finding_pick, method, alpha, slice_slider, level, width,
                                        show_map], [overlay, case_state, sanity, viewer, caption], concurrency_limit=2,
                           api_name="on_finding")
        gr.on([slice_slider.change, level.change, width.change, show_map.change, alpha.change], on_view,
              [model_choice, case_state, slice_slider, level, width, show_map, alpha], [viewer, caption],
              show_progress="hidden", api_name="on_view")
        preset.input(on_preset, [model_choice, case_state, preset], [level, width], api_name="on_preset")
        gr.on([level.input, width.input], lambda: "custom", None, preset, api_name=False)  # dragged or typed: custom
        alpha.change(on_alpha, [case_state, alpha], overlay, show_progress="hidden", api_name="on_alpha")
        jump.click(lambda c: c.slice_index if c else 0, case_state, slice_slider, api_name="jump")
        export.click(lambda run_name, c, a: export_report(get(run_name), c, workdir, a) or None,
                     [model_choice, case_state, alpha], report_file, api_name="export")
        if examples:
            gr.Examples([[[str(e)]] for e in examples], inputs=[upload], outputs=outputs,
                        fn=lambda files: on_upload(first, files, "gradcam", 0.45), run_on_click=True,
                        label="Examples from sample_data")
    demo.queue(max_size=16, default_concurrency_limit=max(1, (os.cpu_count() or 2) // 2))
    return demo


def _examples() -> list[Path]:
    root = Path(__file__).resolve().parents[1] / "sample_data"
    return [p for p in (root / "dicom" / "img_0003.dcm", root / "dicom" / "img_0001.dcm",
                        root / "nifti" / "vol_001.nii.gz") if p.is_file()]


def launch(run: str | Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           prevent_thread_lock: bool = False, max_file_size: str = MAX_FILE_SIZE, device: str = "auto"):
    """Serve the app with safe defaults (loopback, no share link, bounded uploads, private upload folder
    removed on exit and on SIGTERM/SIGINT, failed logins locked out with a growing delay)."""
    throttle = None
    if auth:  # checked before anything is set up
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise MedtlError("--auth must be USER:PASS")
        throttle = LoginThrottle(user, password)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    workdir = Path(tempfile.mkdtemp(prefix="medtl-ui-"))  # mode 0700: only this user reads the uploads
    os.environ["GRADIO_TEMP_DIR"] = str(workdir)
    install_cleanup(workdir)
    demo = create_app(run, workdir, device=device)
    return demo.launch(server_name=host, server_port=port, share=False, auth=throttle,
                       max_file_size=max_file_size, show_error=False, prevent_thread_lock=prevent_thread_lock,
                       footer_links=[], ssr_mode=False, allowed_paths=[], head=VIEWER_HEAD,
                       app_kwargs={"middleware": client_middleware()})
