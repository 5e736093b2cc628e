"""Everything the page says in words: the answer and its basis, what of a scan was judged, refusals, and the
panels that describe the model. The decision's words come from its one owner, the predictor's
:class:`~medtl.predict.post.Decision` (:meth:`~medtl.predict.post.Decision.judgements` and
:meth:`~medtl.predict.post.Decision.describe`): nothing here re-derives a threshold."""

from __future__ import annotations

import html

import numpy as np

from medtl.errors import MedtlInputError
from medtl.eval.quality import ModelQuality, model_quality
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


METHOD_NAMES = {  # the saliency methods as a reader knows them (the options' values are for configurations)
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "occlusion": "occlusion",
    "integrated_gradients": "integrated gradients",
}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def rule_words(rule: str) -> str:
    """How a threshold was chosen, without the statistician's words ("Youden on the smoothed ROC; validation
    sensitivity 0.73, specificity 0.70" -> "to balance sensitivity and specificity: 0.73 and 0.70 there")."""
    if rule.lower().startswith("youden"):
        rates = rule.split(";", 1)[1].strip() if ";" in rule else ""
        return "to balance sensitivity and specificity" + (f"; {rates}" if rates else "")
    return rule


def _chosen(decision: Decision) -> str:
    """Where a binary model's threshold was chosen, and by which rule (the number itself is in the comparison:
    :meth:`~medtl.predict.post.Judgement.comparison` prints it with enough digits)."""
    rule = rule_words(decision.rule)
    return "chosen on validation data" + (f" ({rule})" if rule else "") + _source(decision)


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
        f"The {method_name(case.method)} map is empty for this case (no region raised the score of {target}): "
        "try another saliency method."
    )


def quality_of(predictor: Predictor) -> ModelQuality:
    """The model's test figures and badges (:func:`medtl.eval.quality.model_quality`), for its finding."""
    d = predictor.decision
    finding = d.finding if not d.multi_label and len(d.class_names) == 2 else None
    return model_quality(predictor.run_dir, finding)


def quality_text(predictor: Predictor) -> str:
    """What the page says of the model's quality beside every answer."""
    return f"Model quality: {quality_of(predictor).summary()}"


def validation_size(predictor: Predictor) -> int | None:
    """The validation studies the decision (calibration, threshold) was chosen on, where recorded."""
    val = RunDir(predictor.run_dir).read_json(RunDir.METRICS, {}).get("val") or {}
    return val.get("n_images")


def answer_bars(predictor: Predictor, probabilities: dict[str, float] | None) -> str:
    """The probabilities as bars that agree with the answer (HTML): a binary model with a decision threshold
    shows one bar, the probability of its finding, with the threshold marked on the same scale; a multi-label
    model one bar per finding with its threshold; otherwise a bar per class, the answer first. Whole percent:
    the decision was chosen on a validation set too small for finer figures (said where under 100 studies)."""
    if not probabilities:
        return '<div class="medtl-bars medtl-none">Probabilities: none, the image was not analysed</div>'
    d = predictor.decision
    judged = {j.name: j for j in d.judgements(probabilities) if j.threshold is not None}
    if judged and not d.multi_label:
        names = [d.finding]
        title = f"Probability of {d.finding}, against the decision threshold"
    elif d.multi_label:
        names = list(d.class_names)
        title = "Probability of each finding, judged on its own, against its threshold"
    else:
        names = sorted(probabilities, key=lambda c: -probabilities[c])
        title = "Probability of each class (the answer is the most probable)"
    rows = []
    for name in names:
        p = float(probabilities[name])
        j = judged.get(name)
        marker, said = "", f"{p:.0%}"
        if j is not None:
            marker = f'<div class="medtl-threshold" style="left:{j.threshold:.2%}" title="decision threshold"></div>'
            said += f" ({'at or above' if j.decided else 'below'} the threshold {j.threshold:.0%})"
        attrs = f'data-name="{html.escape(name)}" data-probability="{p:.4f}"' + (
            f' data-threshold="{j.threshold:.4f}"' if j is not None else ""
        )
        rows.append(
            f'<div class="medtl-bar" {attrs}><div class="medtl-bar-name">{html.escape(name)}</div>'
            f'<div class="medtl-bar-track"><div class="medtl-bar-fill" style="width:{p:.2%}"></div>{marker}</div>'
            f'<div class="medtl-bar-value">{html.escape(said)}</div></div>'
        )
    calibrated = "calibrated" if d.calibrated else "not calibrated"
    n = validation_size(predictor)
    if d.calibrated and n is not None and n < 100:
        calibrated += f" on {n} validation studies: read them as approximate (about ±{0.98 / n**0.5:.0%})"
    return (
        f'<div class="medtl-bars"><div class="medtl-bars-title">{html.escape(title)} ({html.escape(calibrated)})'
        f"</div>{''.join(rows)}</div>"
    )


# -- the upload -------------------------------------------------------------------------------------


def upload_name(files: list[str]) -> str:
    """How a message names an upload: its one (showable) file name, or how many files it held."""
    return files[0] if len(files) == 1 else f"{len(files)} files"


def cannot_use_text(name: str, error: MedtlInputError) -> str:
    """Why a file cannot be read, in the reader's words (never a stack trace)."""
    what = "this upload" if name.endswith(" files") else "this file"
    return f"**Cannot use {what}** ({name}): {error.problem}" + (
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
    description = f", {used['description']}" if shown_description(used.get("description")) else ""
    note = (
        f"Series {used.get('series_number')} ({used.get('modality')}{description}, {used.get('slices')} "
        f"slices) is shown: {'chosen by you' if chosen else scan.header.get('series_choice', '')}."
    )
    n_series = len(series_options(series))
    if n_series > 1:
        note += f" The upload holds {n_series} series: pick another below."
    return note  # (an upload of several studies or patients gets no answer: medtl_ui.analysis.one_study)


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
    known = [m for m in rec.get("modalities") or [] if m and m.upper() not in ("UNKNOWN", "OT", "")]
    trained = f"; trained on {', '.join(known)} images" if known else ""  # (never "UNKNOWN images")
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
    d = predictor.decision
    if predictor.multi_label:
        what = "findings " + "; ".join(f"*{c}*" for c in predictor.class_names)
    elif len(d.class_names) == 2:
        what = f"finding *{d.finding}* (against *{d.class_names[1 - d.positive]}*)"
    else:
        what = "classes " + "; ".join(f"*{c}*" for c in predictor.class_names)
    badges = " ".join(f"**[{b}]**" for b in quality_of(predictor).badges())
    return f"{badges} Model **{predictor.run_dir.name}**: {what}{trained}; {calib}; {decision}; {refuses}.".strip()


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
        return f"Check of the {method_name(method)} map: {verdicts[method]}"
    return (
        f"The {method_name(method)} map has not been checked for this model (a check that the map depends on what the "
        "model learnt): read it with care."
    )
