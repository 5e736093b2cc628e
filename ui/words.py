"""Everything the page says in words: the answer and its basis, what of a scan was judged, refusals, and the
panels that describe the model. The decision's words come from its one owner, the predictor's
:class:`~medtl.predict.post.Decision` (:meth:`~medtl.predict.post.Decision.judgements` and
:meth:`~medtl.predict.post.Decision.describe`): nothing here re-derives a threshold."""

from __future__ import annotations

import numpy as np

from medtl.errors import MedtlInputError
from medtl.io import Scan
from medtl.predict.post import Decision
from medtl.predict.predictor import Prediction, Predictor
from medtl.run import RunDir
from medtl_ui.case import Case, read_as, series_options, shown_description

VOLUME_JUDGED = {  # how a volume reached a 2D model, in words (data.volume_mode)
    "middle": "its middle slice only",
    "mip": "a maximum-intensity projection of all its slices",
    "2.5d": "its middle slice with its two neighbours (2.5D)",
    "3d": "the whole volume (3D model)",
}


# -- the answer ------------------------------------------------------------------------------------


def decision_text(predictor: Predictor, pred: Prediction) -> str:
    """The answer in words: the decision and its basis, honestly named, with the numbers it compared."""
    decision = predictor.decision
    judged = decision.judgements(pred.probabilities)
    calibrated = "calibrated " if decision.calibrated else ""
    if decision.multi_label:
        each = "; ".join(f"*{j.name}* {j.comparison()}" for j in judged)
        found = ", ".join(pred.findings or []) or "none of the findings"
        return (
            f"**Findings: {found}** — each finding on its own, decided by {decision.describe()}"
            f"{_source(decision)}: {each}.{_calibration(decision)}"
        )
    j = judged[0]
    if j.threshold is not None:
        return (
            f"**Predicted class: {pred.label}** — the {calibrated}probability of *{j.name}* against the decision "
            f"threshold {_chosen(decision)}: {j.comparison()}."
        )
    return (
        f"**Predicted class: {pred.label}** — the most probable class ({calibrated}probability "
        f"{j.comparison()}). No decision threshold was chosen for this model: this is the class with the "
        "highest probability, not a decision at a chosen operating point."
    )


def decision_basis(decision: Decision, probabilities: dict[str, float], digits: int = 3) -> str:
    """Where the decision comes from and the comparisons it made, on one line (the case report's "Basis")."""
    judged = [j for j in decision.judgements(probabilities) if j.threshold is not None]
    if judged and not decision.multi_label:
        return (
            f"the probability of {judged[0].name} against the decision threshold {_chosen(decision)}: "
            f"{judged[0].comparison(digits)}"
        )
    compared = "; ".join(f"{j.name} {j.comparison(digits)}" for j in judged)
    return decision.describe() + _source(decision) + (f": {compared}" if compared else "")


def _chosen(decision: Decision) -> str:
    """Where a binary model's threshold was chosen, and by which rule (the number itself is in the comparison:
    :meth:`~medtl.predict.post.Judgement.comparison` prints it with enough digits)."""
    return "chosen on validation data" + (f" ({decision.rule})" if decision.rule else "") + _source(decision)


def _source(decision: Decision) -> str:
    """Which step chose the decision, where it is not training's."""
    return " (the decision chosen by the model's evaluation)" if decision.source == "evaluation" else ""


def _calibration(decision: Decision) -> str:
    return " The probabilities are calibrated on validation data." if decision.calibrated else ""


def judged_text(predictor: Predictor, case: Case) -> str:
    """What of the scan the model judged, in words."""
    if not case.scan.is_volume:
        return ""
    mode = predictor.config.data.volume_mode
    n = case.n_slices
    if case.prediction.get("slice_scores"):
        return (
            f"Every slice of this volume was scored ({n} slices; the study's probability is the "
            f"{predictor.config.data.slice_aggregation} of the slices'); slice {case.slice_index + 1} scores "
            "highest."
        )
    if not case.judged_slice:
        return f"This volume of {n} slices was judged on {VOLUME_JUDGED.get(mode, mode)}, not on one slice."
    return f"This volume of {n} slices was judged on {VOLUME_JUDGED.get(mode, mode)}: slice {case.slice_index + 1}."


def empty_map_text(case: Case) -> str:
    """A word when the saliency map is empty (no region raised the score), rather than a plain picture."""
    if case.image is None:
        return "No saliency map: maps are drawn for 2D models only."
    if case.saliency is None or np.any(case.saliency > 0.01):
        return ""
    target = case.target or case.prediction["label"]
    return (
        f"The {case.method} map is empty for this case (no region raised the score of {target}): "
        "try another saliency method."
    )


# -- the upload -------------------------------------------------------------------------------------


def upload_name(files: list[str]) -> str:
    """How a message names an upload: its one (showable) file name, or how many files it held."""
    return files[0] if len(files) == 1 else f"{len(files)} files"


def cannot_use_text(name: str, error: MedtlInputError) -> str:
    """Why a file cannot be read, in the reader's words (never a stack trace)."""
    return f"**Cannot use this file** ({name}): {error.problem}" + (
        f" — expected {error.expected}." if error.expected else "."
    )


def failed_text(name: str, error: Exception) -> str:
    """An analysis that failed unexpectedly: the kind of error only."""
    return f"**Analysis failed** for {name} ({type(error).__name__}). The file may be damaged."


def not_analysed_text(name: str, refused: str) -> str:
    """The model's refusal to answer for an image unlike its training images, with the reason."""
    return f"**Not analysed** ({name}): {refused}. The model answers only for images like those it was trained on."


def series_note(series: list[dict], scan: Scan, chosen: bool) -> str:
    """Which series of a multi-series upload is shown and why; how many there are; a warning where the files
    come from several studies. "" for an upload of one file."""
    if not series:
        return ""
    used = scan.header.get("series", {})
    studies = {s.get("study_key") for s in series if s.get("study_key")}
    description = f", {used['description']}" if shown_description(used.get("description")) else ""
    note = (
        f"Series {used.get('series_number')} ({used.get('modality')}{description}, {used.get('slices')} "
        f"slices) is shown: {'chosen by you' if chosen else scan.header.get('series_choice', '')}."
    )
    n_series = len(series_options(series))
    if n_series > 1:
        note += f" The upload holds {n_series} series: pick another below."
    if len(studies) > 1:
        note += (
            f" **These files come from {len(studies)} different studies**: only the series shown is "
            "analysed. Upload one study at a time."
        )
    return note


def modality_note(predictor: Predictor, scan: Scan) -> str:
    """For a grey file that names no modality: the modality the model reads it as ("" otherwise)."""
    if scan.modality or scan.rgb is not None or not read_as(predictor, scan):
        return ""
    return (
        f"The file does not name its modality: read as {read_as(predictor, scan)}, the modality the model "
        "was trained on."
    )


def case_heading(case: Case) -> str:
    """The case's key, the names of its files (the first five) and which series is shown."""
    names = ", ".join(case.files[:5]) + (f" and {len(case.files) - 5} more" if len(case.files) > 5 else "")
    return f"**Case {case.key}** — {names}. {case.series_note}".strip()


# -- the model --------------------------------------------------------------------------------------


def model_summary(predictor: Predictor) -> str:
    """One line on the model: its classes, the images it was trained on, calibration, how it decides, and
    what it refuses."""
    rec = predictor.input_record or {}
    trained = f"; trained on {', '.join(rec['modalities'])} images" if rec.get("modalities") else ""
    calib = (
        "probabilities calibrated on validation data"
        if predictor.decision.calibrated
        else "probabilities not calibrated"
    )
    chosen = predictor.decision.basis in ("operating point", "operating points")
    if predictor.multi_label:
        decision = (
            "several findings per image, each decided at its own threshold chosen on validation data"
            if chosen
            else "several findings per image, each decided at 0.5"
        )
    else:
        decision = (
            "a decision threshold chosen on validation data"
            if chosen
            else "no decision threshold (the most probable class is shown)"
        )
    refuses = (
        "refuses images unlike its training images"
        if predictor.ood
        else "checks only modality, dimensions and colour of an image (no content check)"
    )
    kind = "findings" if predictor.multi_label else "classes"
    return (
        f"Model **{predictor.run_dir.name}**: {kind} {', '.join(predictor.class_names)}{trained}; {calib}; "
        f"{decision}; {refuses}."
    )


def probability_label(predictor: Predictor) -> str:
    """The title of the probabilities panel: what the numbers are, and whether they are calibrated."""
    what = "Probability of each finding, judged on its own" if predictor.multi_label else "Class probabilities"
    return what + " (" + ("calibrated on validation data" if predictor.decision.calibrated else "not calibrated") + ")"


def trust_panel(predictor: Predictor) -> str:
    """The model card written by `medtl evaluate`, or what is known without it, in a clinician's words."""
    run = RunDir(predictor.run_dir)
    card = run.evaluation / RunDir.EVALUATION_CARD
    if card.is_file():
        return card.read_text()
    auc = (run.read_json(RunDir.METRICS, {}).get("test") or {}).get("auc")
    known = f" On the patients held out when it was trained, its AUC was {auc:.2f}." if auc is not None else ""
    return (
        "_This model has not been through a full evaluation (confidence intervals, calibration check, "
        f"saliency checks), so how far to trust it is not documented.{known} Ask whoever trained it for its "
        "evaluation report._"
    )


def sanity_text(predictor: Predictor, method: str) -> str:
    """What the evaluation's saliency check said of ``method``'s maps for this model, or that none was made."""
    record = RunDir(predictor.run_dir).read_json(f"{RunDir.EVALUATION}/{RunDir.EVALUATION_RECORD}", {})
    verdicts = {s["method"]: s["verdict"] for s in record.get("saliency_sanity", [])}
    if method in verdicts:
        return f"Check of the {method} map: {verdicts[method]}"
    return (
        f"The {method} map has not been checked for this model (a check that the map depends on what the "
        "model learnt): read it with care."
    )
