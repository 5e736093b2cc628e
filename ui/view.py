"""What the page draws of a case: the viewer's windowed slice with the saliency map on it, the window
presets, the de-identified header, the per-slice score plot, and images enlarged at their true physical
proportions. :func:`run_case` opens an upload and draws it, for scripts and tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from medtl.clinical.deid import profile_keeps
from medtl.config import CT_WINDOWS
from medtl.errors import MedtlError
from medtl.explain import create_overlay
from medtl.io import Scan
from medtl.predict.predictor import Predictor
from medtl.transforms.intensity import intensity_preset
from medtl_ui.analysis import open_case, slice_map
from medtl_ui.case import Case, read_as, shown_description, store_case_files
from medtl_ui.words import method_name

MODEL_WINDOW = "model's window"
SHOWN_FIELDS = ("modality", "BodyPartExamined", "Manufacturer", "shape", "spacing_mm", "orientation", "units", "format")


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


def pixel_aspect(scan: Scan) -> float:
    """Row spacing / column spacing of the scan's pixels (1 where the spacing is unknown)."""
    sp = scan.spacing[-2:]
    return float(sp[0] / sp[1]) if sp[1] > 0 else 1.0


def overlay_view(case: Case, alpha: float) -> np.ndarray | None:
    """The model's view with its saliency map at opacity ``alpha``, for the page (None: no map)."""
    if case.refused or case.image is None:
        return None
    return for_display(create_overlay(case.image, case.saliency, alpha), aspect=pixel_aspect(case.scan))


# -- windows ----------------------------------------------------------------------------------------


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
    (:func:`medtl.transforms.intensity.intensity_preset`): its CT window (the first of a multi-window stack),
    the file's own window, the type's full range, or the data's percentiles."""
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
    a = (
        scan.array[int(np.clip(index, 0, scan.array.shape[0] - 1))]
        if scan.is_volume
        else (scan.array if scan.array.ndim == 2 else scan.array[0])
    )
    lo, hi = level - width / 2, level + width / 2
    out = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    return (out * 255).astype(np.uint8)


# -- the viewer -------------------------------------------------------------------------------------


def render_view(
    predictor: Predictor, case: Case | None, index: int, level: float, width: float, show_map: bool, alpha: float
) -> tuple[np.ndarray | None, str]:
    """(viewer image, caption): the windowed slice, with the saliency map on it where the model judged it."""
    if case is None:
        return None, ""
    index = int(np.clip(index or 0, 0, case.n_slices - 1))
    view = window_slice(case.scan, index, float(level or 0), float(width or 1))
    caption = f"Slice {index + 1} of {case.n_slices}." if case.scan.is_volume else ""
    if show_map and not case.refused:
        view, said = _map_on_slice(predictor, case, index, view, alpha)
        caption += said
    return for_display(view, aspect=pixel_aspect(case.scan)), caption.strip()


def _map_on_slice(
    predictor: Predictor, case: Case, index: int, view: np.ndarray, alpha: float
) -> tuple[np.ndarray, str]:
    """(the slice with its saliency map on it, the caption's words on the map); the slice as it was where the
    model drew no map for it."""
    try:
        sal = slice_map(predictor, case, index)
    except MedtlError:
        sal = None
    if sal is None and case.image is None:
        return view, " No saliency map for this model."
    if sal is None and not case.judged_slice:
        return view, " The model judged the volume as a whole: its map is on the model's view, not on a slice."
    if sal is None:
        return view, f" The model judged slice {case.slice_index + 1} only: no map on this slice."
    if sal.shape != view.shape[:2]:
        sal = np.asarray(Image.fromarray(sal.astype(np.float32)).resize(view.shape[1::-1], Image.Resampling.BILINEAR))
    said = (
        f" {method_name(case.method)} map on this slice."
        if np.any(sal > 0.01)
        else f" The {method_name(case.method)} map is empty here (no region raised the score): try another method."
    )
    return create_overlay(view / 255.0, sal, alpha), said


def header_summary(scan: Scan) -> dict:
    """The de-identified header fields the page shows."""
    s = scan.summary()
    out = {k: s[k] for k in SHOWN_FIELDS if k in s and profile_keeps(k)}  # what `medtl deid` would keep
    if "series" in s:
        out["series"] = {k: s["series"][k] for k in ("series_number", "modality", "slices")}
        if shown_description(s["series"].get("description")):
            out["series"]["description"] = s["series"]["description"]
        out["series_choice"] = s.get("series_choice")
    return out


def slice_profile(case: Case | None) -> np.ndarray | None:
    """A plot (PNG array) of the per-slice score of a volume, or None for a 2D image."""
    if case is None or not case.prediction.get("slice_scores"):
        return None
    import matplotlib  # heavy optional dependency: imported when a volume's scores are drawn

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


# -- one call, for scripts and tests -----------------------------------------------------------------


def run_case(
    predictor: Predictor, file_path, method: str = "gradcam", alpha: float = 0.45, workdir: Path | None = None
) -> tuple:
    """(image, probabilities, overlay, message, case) for an upload (a path or a list of paths); the
    files are moved to random names under ``workdir``. The case is None when nothing could be read."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="medtl-ui-"))
    if not file_path:
        return (
            None,
            None,
            None,
            "Upload a DICOM (file, several files of one series or a .zip of a study), NIfTI or PNG/JPEG.",
            None,
        )
    path, files, key = store_case_files(file_path, workdir)
    case, message = open_case(predictor, path, method, files=files, key=key)
    if case is None or case.refused:
        return None, None, None, message, case
    if case.image is None:  # answered without a map (a 3D model)
        return None, case.prediction["probabilities"], None, message, case
    aspect = pixel_aspect(case.scan)
    image = (np.clip(case.image, 0, 1) * 255).astype(np.uint8)
    overlay = create_overlay(case.image, case.saliency, alpha)
    return (
        for_display(image, aspect=aspect),
        case.prediction["probabilities"],
        for_display(overlay, aspect=aspect),
        message,
        case,
    )


def analyse(
    predictor: Predictor, file_path, method: str = "gradcam", alpha: float = 0.45, workdir: Path | None = None
) -> tuple:
    """(image, probabilities, overlay, message) for an upload (see :func:`run_case`)."""
    return run_case(predictor, file_path, method, alpha, workdir)[:4]
