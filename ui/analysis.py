"""A case read, judged and explained: :func:`open_case` for an upload, :func:`explain_case` for another
saliency map of the same answer, :func:`slice_map` for the map of one slice (computed once, then kept)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medtl.errors import MedtlInputError
from medtl.io import Scan, describe_path_bounded, read_image_bounded
from medtl.predict.predictor import Prediction, Predictor
from medtl_ui.case import Case
from medtl_ui.words import (
    cannot_use_text,
    decision_text,
    empty_map_text,
    failed_text,
    judged_text,
    modality_note,
    not_analysed_text,
    quality_of,
    series_note,
    upload_name,
)

log = logging.getLogger("medtl.ui")


def open_case(
    predictor: Predictor,
    path: Path,
    method: str = "gradcam",
    series_uid: str | None = None,
    files: list[str] | None = None,
    key: str = "",
) -> tuple[Case | None, str]:
    """Read, judge and explain one case; (case, message). The case is None when the file cannot be read."""
    files = files or [path.name]
    name = upload_name(files)
    quality = quality_of(predictor)
    if not quality.fit:  # below the quality floor: no answer at all, whatever the file
        log.info("no answer: the model is below the quality floor")
        return None, quality.not_fit_text() + " " + quality.sentence()
    try:
        scan, series, note = read_case(path, series_uid)
        pred = predictor.predict(scan)
    except MedtlInputError as e:
        log.info("refused upload: %s", type(e).__name__)
        return None, cannot_use_text(name, e)
    except Exception as e:  # never show a stack trace to the page
        log.error("analysis failed: %s", type(e).__name__)
        return None, failed_text(name, e)
    note = " ".join(x for x in (note, modality_note(predictor, scan)) if x)
    case = Case(
        path=path,
        scan=scan,
        key=key,
        files=files,
        series=series,
        series_uid=series_uid or scan.header.get("series", {}).get("series_uid"),
        series_note=note,
        prediction=vars(pred),
        refused=pred.refused,
        method=method,
        slice_index=int(pred.slice_index or 0),
        judged_slice=pred.slice_index is not None or not scan.is_volume,
        series_chosen=bool(series_uid),
    )
    if not case.judged_slice or pred.refused:
        case.slice_index = case.n_slices // 2
    if pred.refused:
        log.info("refused upload: %s", pred.refused.split(",")[0])
        case.message = not_analysed_text(name, pred.refused)
        return case, case.message
    explain_case(predictor, case, method)
    case.judged = judged_text(predictor, case)
    case.message = " ".join(x for x in (decision_text(predictor, pred), case.judged, empty_map_text(case)) if x)
    case.message += f"\n\nModel quality: {quality.summary()}"
    return case, case.message


def read_case(path: Path, series_uid: str | None = None) -> tuple[Scan, list[dict], str]:
    """(scan, the upload's series, which series is shown and why) of an upload, read in the bounded worker:
    a file, or a folder or zip of DICOM files (then ``series_uid`` picks a series; default: medtl's rules)."""
    series = []
    if path.is_dir():
        one_kind(path)
    if path.is_dir() or path.suffix.lower() == ".zip":
        # the series, from their headers (an unusable listing: the read below says why)
        series = describe_path_bounded(path, decode=False).get("series", [])
        one_study(series)
    scan = read_image_bounded(path, series_uid=series_uid) if series_uid else read_image_bounded(path)
    return scan, series, series_note(series, scan, chosen=bool(series_uid))


KINDS = {".nii": "NIfTI", ".gz": "NIfTI", ".png": "picture", ".jpg": "picture", ".jpeg": "picture", ".zip": "zip"}


def one_kind(folder: Path) -> None:
    """A several-file upload is one DICOM series or study: a NIfTI, a picture or a zip beside other files is
    refused (rather than one of them dropped without a word)."""
    kinds = sorted({KINDS.get(f.suffix.lower(), "DICOM") for f in folder.iterdir() if f.is_file()})
    if len(kinds) > 1:
        raise MedtlInputError(
            None,
            f"the upload mixes {' and '.join(kinds)} files, and a case is one study",
            "one study per case: upload a NIfTI or a picture on its own, a DICOM study as its files or a zip",
        )


def one_study(series: list[dict]) -> None:
    """An upload of several studies, or of several patients, gets no answer (which one was judged?)."""
    patients = {s.get("patient_key") for s in series if s.get("patient_key")}
    studies = {s.get("study_key") for s in series if s.get("study_key")}
    if len(patients) > 1 or len(studies) > 1:
        what = f"{len(patients)} patients" if len(patients) > 1 else f"{len(studies)} studies"
        raise MedtlInputError(
            None, f"the files come from {what}", "one study of one patient per case: upload one study at a time"
        )


def explain_case(predictor: Predictor, case: Case, method: str) -> None:
    """Compute the saliency map of ``method`` for the case's prediction (the prediction is reused)."""
    pred = Prediction(**case.prediction)
    case.method = method
    try:
        if case.inputs is None:
            case.inputs = predictor.inputs(case.scan)
        expl = predictor.saliency(case.scan, pred, class_name=case.target, method=method, prepared=(*case.inputs, None))
    except Exception as e:  # a 3D model, or a map that fails: no map, and the answer stands
        log.info("no saliency map: %s", type(e).__name__)
        case.image = case.saliency = None
        return
    case.image, case.saliency = expl.image, expl.saliency
    case.keep_map((method, case.target, case.slice_index), expl.saliency)


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
    expl = predictor.saliency(
        case.scan, pred, class_name=case.target, method=case.method, slice_index=index, prepared=(*case.inputs, None)
    )
    case.keep_map((case.method, case.target, index), expl.saliency)
    return expl.saliency
