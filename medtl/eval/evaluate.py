"""``evaluate_run``: a run folder in, an honest evaluation out.

Writes into ``RUN/evaluation/`` (:attr:`medtl.run.RunDir.evaluation`): ``report.html`` (self-contained:
figures embedded, opens offline), the figures as PNG, ``evaluation.json``, ``model_card.md`` /
``model_card.json`` and ``decision.json``: the temperature and operating point this evaluation chose on
validation data. The run's weights are not rewritten: its answers keep the training decision unless a
user asks for the evaluation's (``medtl predict --decision evaluation``, ``Predictor(decision=...)``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.data.dataset import study_index
from medtl.data.manifest import label_text
from medtl.errors import RunError, look_up_option
from medtl.eval.card import model_card, model_card_markdown, report_html
from medtl.eval.figures import evaluation_figures
from medtl.eval.sanity import run_sanity_checks
from medtl.explain import METHODS, compute_saliency, explain_input
from medtl.metrics import binary_rates, bootstrap_ci, compute_auc_ci, compute_binary_metrics, compute_ece, compute_nll
from medtl.models.groups import encoder_groups
from medtl.predict.forward import extract_features, predict_logits
from medtl.predict.ood import foreign_check, study_scores
from medtl.predict.post import Decision
from medtl.predict.predictor import Predictor
from medtl.progress import Phases, Steps
from medtl.run import RunDir, SavedRun, load_saved_run
from medtl.runtime import Runtime, inference_precision, resolve_device
from medtl.threads import fit_threads
from medtl.train import create_seeded_model, prepare_data, read_data, train_model
from medtl.transforms import display_image

log = logging.getLogger("medtl.eval")


@dataclass
class Evaluation:
    """What :func:`compute_evaluation` measured: the JSON-ready ``result`` and the arrays the figures
    are drawn from. Nothing here is rendered."""

    result: dict  # AUC with CI, calibration, operating point, subgroups, saliency sanity (evaluation.json)
    class_names: list[str]
    test_labels: np.ndarray  # (n_studies,) test labels
    test_probs_raw: np.ndarray  # (n_studies, classes) before temperature scaling
    test_probs: np.ndarray  # (n_studies, classes) after temperature scaling
    patients: np.ndarray  # (n_studies,) patient of each test study (the bootstrap's unit)
    decision: Decision  # the temperature and operating point(s) this evaluation chose on validation data
    cases: list[dict] = field(default_factory=list)  # wrong and correct test cases with their Grad-CAM overlays


# The saliency methods checked by default: the two gradient CAMs (about 0.2 s a map here) and the run's own method.
# Occlusion and Integrated Gradients cost about 1.5 s a map (tens of maps: a minute each on 2 cores), so they are
# checked when asked (``methods``, ``medtl evaluate --methods all``); the page says a map was not checked.
DEFAULT_SANITY_METHODS = ("gradcam", "gradcampp")
# Relative cost of each phase (measured on the demo run, 2 cores), for the estimate of the time left.
PHASE_COSTS = {
    "predictions": 2.0,
    "intervals": 1.0,
    "test cases": 1.0,
    "shuffled-label model": 25.0,
    "gradcam": 1.0,
    "gradcampp": 1.0,
    "occlusion": 12.0,
    "integrated_gradients": 12.0,
    "out-of-distribution check": 2.0,
    "figures and report": 3.0,
}
DATA_RANDOMISATION_OFF = (
    "not run: it retrains the model on shuffled labels (minutes); opt in with medtl evaluate --data-randomisation"
)


def sanity_methods(cfg) -> tuple[str, ...]:
    """The saliency methods checked by default for a run: :data:`DEFAULT_SANITY_METHODS` and its own method."""
    return tuple(dict.fromkeys((*DEFAULT_SANITY_METHODS, cfg.explain.method)))


def evaluation_phases(methods: Sequence[str], data_randomisation: bool, ood: bool = True) -> Phases:
    """The phases of an evaluation in the order they run, each with its expected relative cost."""
    names = ["predictions", "intervals", "test cases"]
    names += ["shuffled-label model"] if data_randomisation else []
    names += [*methods, *(["out-of-distribution check", "figures and report"] if ood else [])]
    return Phases([(n, PHASE_COSTS.get(n, 1.0)) for n in names], log, "evaluation")


def compute_evaluation(
    saved: SavedRun,
    cfg,
    prepared,
    runtime: Runtime,
    n_boot: int = 1000,
    operating_point: str = "youden",
    methods: Sequence[str] | None = None,
    sanity_images: int = 3,
    data_randomisation: bool = False,
    seed: int = 0,
    phases: Phases | None = None,
) -> Evaluation:
    """Measure a saved run on ``prepared``'s test split: every choice (temperature, operating point) is
    made on the validation split; intervals resample patients. ``methods``: the saliency methods to check
    (default :func:`sanity_methods`); ``data_randomisation``: also train a model on shuffled labels for the
    data randomisation test (minutes)."""
    methods = sanity_methods(cfg) if methods is None else tuple(methods)
    phases = phases or evaluation_phases(methods, data_randomisation, ood=False)
    model, pre, class_names = saved.model, saved.preprocessing, saved.class_names
    _, val_ds, test_ds = prepared.datasets(cfg.data, pre)
    phases.start("predictions", f"{len(val_ds)} validation and {len(test_ds)} test inputs")
    val_logits, test_logits = (predict_logits(model, ds, runtime, 64) for ds in (val_ds, test_ds))
    positive = (saved.operating_point or {}).get("positive")  # training's finding (None: the second class)
    decision = Decision.fit(val_logits, class_names, operating_point, source="evaluation", positive=positive)
    test_y, test_p_raw = test_logits.study_probs()
    _, test_p = test_logits.study_probs(decision.temperature or 1.0)
    patients = np.asarray([s["patient_id"] for s in prepared.sets["test"]])
    phases.start("intervals", f"{n_boot} patient resamples")
    result = _measured(saved, cfg, runtime, val_logits, decision, test_y, test_p_raw, test_p, patients, n_boot, seed)
    result["subgroups"] = _subgroups(prepared.sets["test"], test_y, test_p, patients, n_boot, seed)
    phases.start("test cases")
    inputs, cases = _cases(
        model, test_ds, prepared.sets["test"], test_y, test_p, decision.choose(test_p), class_names, runtime
    )
    shuffled = None
    if data_randomisation:
        phases.start("shuffled-label model")
        shuffled = _train_on_shuffled_labels(cfg, prepared, len(class_names), seed, runtime)
    checked = inputs[:sanity_images]
    result["saliency_sanity"] = _saliency_checks(model, checked, methods, shuffled, seed, runtime, phases)
    result["saliency_sanity_scope"] = {
        "checked": list(methods),
        "not_checked": [m for m in METHODS if m not in methods],
        "data_randomisation": "run" if data_randomisation else DATA_RANDOMISATION_OFF,
    }
    return Evaluation(result, class_names, test_y, test_p_raw, test_p, patients, decision, cases)


def _measured(saved, cfg, runtime, val_logits, decision, test_y, test_p_raw, test_p, patients, n_boot, seed) -> dict:
    """The evaluation record's figures: AUC with its interval, calibration, the operating point's metrics."""
    result: dict = {
        "run": saved.run_dir.name,
        "date": datetime.date.today().isoformat(),
        "data": Path(cfg.data.path).name,
        "n_test_images": len(test_y),
        "n_test_patients": len(set(patients.tolist())),
        "class_names": saved.class_names,
        "precision": runtime.precision,
        "device": str(runtime.device),
    }
    result["auc"] = compute_auc_ci(test_y, test_p, patients, n_boot, seed)
    result["calibration"] = _calibration(val_logits, decision, test_y, test_p_raw, test_p, patients, n_boot, seed)
    if decision.multi_label:
        result["multi_label"] = True
        result["per_label"] = _per_label(test_y, test_p_raw, test_p, decision, patients, n_boot, seed)
    elif decision.threshold is not None:
        result["operating_point"] = {
            **decision.operating_point,
            "positive": decision.finding,
            **_binary_metrics_ci(*decision.positive_view(test_y, test_p), decision.threshold, patients, n_boot, seed),
        }
    return result


def _saliency_checks(model, inputs, methods, shuffled, seed, runtime, phases: Phases) -> list[dict]:
    """The randomisation checks of each method (:func:`medtl.eval.sanity.run_sanity_checks`), one phase each."""
    out = []
    maps = len(inputs) * (2 + len(encoder_groups(model)) + (shuffled is not None))  # (reference, head, each group)
    for method in methods:
        phases.start(method, "saliency check")
        steps = Steps(f"saliency check {method}", maps, log, "maps")

        def saliency(m, x, c, meth=method, steps=steps):
            smap = compute_saliency(m, x, c, meth, runtime=runtime)
            steps.advance()
            return smap

        res = run_sanity_checks(model, inputs, saliency, method, shuffled, seed, runtime=runtime)
        out.append(res.to_dict())
        log.info("saliency %s: %s", method, res.verdict)
    return out


def _calibration(val_logits, decision: Decision, test_y, test_p_raw, test_p, patients, n_boot, seed) -> dict:
    """The temperature's effect: validation NLL and test ECE before and after it (with the ECE's interval)."""
    val_y, val_p_raw = val_logits.study_probs()
    _, val_p_cal = val_logits.study_probs(decision.temperature or 1.0)
    return {
        "temperature": decision.temperature,
        "val_nll_before": compute_nll(val_y, val_p_raw),
        "val_nll_after": compute_nll(val_y, val_p_cal),
        "test_ece_before": compute_ece(test_y, test_p_raw),
        "test_ece_after": compute_ece(test_y, test_p),
        "test_ece_after_ci": bootstrap_ci(lambda i: compute_ece(test_y[i], test_p[i]), patients, n_boot, seed),
    }


def _per_label(labels, probs_raw, probs, decision: Decision, patients, n_boot, seed) -> dict:
    """Multi-label: each finding's AUC with its patient-bootstrap interval, the metrics at its operating point
    (chosen on validation) with intervals, and its calibration before and after temperature scaling."""
    out = {}
    thresholds = decision.finding_thresholds
    for k, name in enumerate(decision.class_names):
        y, p = labels[:, k], probs[:, k]
        row = {"n_positive": int(y.sum()), "prevalence": float(y.mean()), "rule": decision.rules[k]}
        if len(np.unique(y)) == 2:
            row.update(compute_auc_ci(y, np.stack([1 - p, p], 1), patients, n_boot, seed))
            row.update(_binary_metrics_ci(y, p, thresholds[k], patients, n_boot, seed))
        else:
            row.update(
                auc=None,
                auc_ci=None,
                threshold=thresholds[k],
                why="the test studies are all of one kind for this finding",
            )
        row["ece_before"] = compute_ece(y, np.stack([1 - probs_raw[:, k], probs_raw[:, k]], 1))
        row["ece_after"] = compute_ece(y, np.stack([1 - p, p], 1))
        out[name] = row
    return out


def _binary_metrics_ci(labels, scores, threshold, patients, n_boot, seed) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1 at ``threshold``, with patient-bootstrap CIs for the first three."""
    at = compute_binary_metrics(labels, scores, threshold)
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
        at[f"{key}_ci"] = bootstrap_ci(
            lambda i, k=key: binary_rates(labels[i], scores[i], threshold)[k], patients, n_boot, seed
        )
    return at


SUBGROUP_COLUMNS = ("site", "modality", "sex", "scanner")  # manifest columns that define subgroups


def _subgroups(studies, labels, probs, patients, n_boot, seed) -> dict:
    """AUC (with CI) per value of each subgroup column the test studies carry (two values at least)."""
    subgroups = {}
    for column in SUBGROUP_COLUMNS:
        values = [s.get(column) for s in studies]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        rows = []
        for v in sorted(set(values)):
            m = np.asarray([x == v for x in values])
            row = {"value": v, "n": int(m.sum())}
            if len(np.unique(labels[m])) == 2:
                row.update(compute_auc_ci(labels[m], probs[m], patients[m], n_boot, seed))
            rows.append(row)
        subgroups[column] = rows
    return subgroups


def _cases(model, test_ds, studies, labels, probs, pred, class_names, runtime) -> tuple[list, list[dict]]:
    """Up to 3 wrong and 5 correct test studies: their middle model input and a Grad-CAM overlay (multi-label:
    wrong when any finding is, the map of the most probable finding)."""
    inputs, cases = [], []
    multi = labels.ndim == 2
    right = (pred == labels).all(axis=1) if multi else pred == labels
    order = list(np.where(~right)[0][:3]) + list(np.where(right)[0][:5])
    for i in order[:8]:
        parts = [p for p in test_ds.data if p.get("study") == i]
        x = test_ds.transform(parts[len(parts) // 2])["image"][None]
        inputs.append(x)
        image = display_image(studies[i])
        target = int(probs[i].argmax()) if multi else int(pred[i])
        _, overlay = explain_input(model, x, image, target, "gradcam", runtime)
        cases.append(
            {
                "image": image,
                "overlay": overlay,
                "true": label_text(labels[i], class_names),
                "pred": label_text(pred[i], class_names),
                "p": float(probs[i, target]),
                "correct": bool(right[i]),
            }
        )
    return inputs, cases


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    n_boot: int = 1000,
    operating_point: str = "youden",
    methods: Sequence[str] | None = None,
    sanity_images: int = 3,
    data_randomisation: bool = False,
    seed: int = 0,
    device: str = "auto",
    foreign: list[str | Path] | None = None,
) -> dict:
    """Evaluate a run on its test split (or on ``data``); write the report, figures, model card and the
    decision it chose (see module doc) into ``RUN/evaluation/``. Models run on ``device``. Each phase is
    logged as it starts, with the time so far and an estimate of the time left.

    ``methods``: the saliency methods whose maps are checked (default :func:`sanity_methods`: the gradient CAMs
    and the run's own method; :data:`medtl.explain.METHODS` for all). ``data_randomisation``: also retrain the
    model on shuffled labels for the data randomisation test (off by default: minutes).
    ``foreign``: files unlike the training data (other modalities, body parts, photographs): the report
    gives the out-of-distribution detector's AUROC against the test studies, and its refusal rates."""
    run = RunDir.open(run_dir)
    saved = load_saved_run(run.path)
    cfg = saved.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    methods = sanity_methods(cfg) if methods is None else tuple(dict.fromkeys(methods))
    for m in methods:  # a misspelt method fails now, not after minutes of work
        look_up_option(m, METHODS, "saliency method")
    phases = evaluation_phases(methods, data_randomisation)
    runtime = Runtime(resolve_device(device), inference_precision(None), tta=cfg.train.tta)
    fit_threads()
    runtime.prepare(saved.model)
    manifest = read_data(cfg.data)
    if manifest.class_names != saved.class_names:
        raise RunError(f"{cfg.data.path}: classes {manifest.class_names} differ from the model's {saved.class_names}")
    prepared = prepare_data(cfg.data, saved.preprocessing, cfg.train.seed, manifest)
    ev = compute_evaluation(
        saved, cfg, prepared, runtime, n_boot, operating_point, methods, sanity_images, data_randomisation, seed, phases
    )
    phases.start("out-of-distribution check")
    ev.result["ood"] = _ood_check(run, saved, cfg, prepared, foreign or [], device)
    phases.start("figures and report")
    write_evaluation(
        run,
        ev,
        model_card(run, ev.result, prepared, cfg, saved),
        evaluation_figures(ev, run / RunDir.HISTORY, min(n_boot, 300), seed),
    )
    phases.finish()
    log.info("evaluation written to %s", run.evaluation)
    return ev.result


def write_evaluation(run: RunDir, ev: Evaluation, card: dict, figures: dict[str, bytes]) -> None:
    """``RUN/evaluation/``: the figures, ``evaluation.json``, the model card, the report and the decision."""
    run.evaluation.mkdir(exist_ok=True)
    for name, png in figures.items():
        (run.evaluation / f"{name}.png").write_bytes(png)
    run.write_json(f"{RunDir.EVALUATION}/{RunDir.EVALUATION_RECORD}", ev.result)
    run.write_json(f"{RunDir.EVALUATION}/{RunDir.EVALUATION_CARD_RECORD}", card)
    (run.evaluation / RunDir.EVALUATION_CARD).write_text(model_card_markdown(card))
    (run.evaluation / RunDir.REPORT).write_text(report_html(ev.result, card, figures))
    run.write_decision(ev.decision.to_record())


def _ood_check(run: RunDir, saved: SavedRun, cfg, prepared, foreign: list, device: str) -> dict:
    """The out-of-distribution detector against ``foreign`` files (see :func:`medtl.predict.ood.foreign_check`)."""
    predictor = Predictor(run.path, device=device, bounded=True)  # foreign files: anyone's
    if predictor.ood is None:
        return {"measured": False, "why": "the run has no out-of-distribution detector"}
    if not foreign:
        return {
            "measured": False,
            **predictor.ood.describe(),
            "why": "no foreign images given (medtl evaluate --foreign FILE...)",
        }
    _, _, test_ds = prepared.datasets(cfg.data, saved.preprocessing)
    features, _ = extract_features(predictor.model, test_ds, predictor.runtime)
    in_scores = study_scores(predictor.ood.score(features), study_index(test_ds))
    return {**predictor.ood.describe(), **foreign_check(predictor, in_scores, foreign)}


def _train_on_shuffled_labels(cfg, prepared, n_classes, seed, runtime: Runtime):
    """The same encoder and strategy trained on permuted training labels (data randomisation test), through
    the training recipe (:func:`medtl.train.train_model`) with at most 2 + 3 epochs."""
    rng = np.random.default_rng(seed + 99)
    train = [dict(s) for s in prepared.sets["train"]]
    for s, y in zip(train, rng.permutation(np.asarray([s["label"] for s in train]))):
        s["label"] = tuple(int(v) for v in y) if np.ndim(y) else int(y)  # multi-label: whole rows move
    short = dataclasses.replace(
        cfg.train,
        frozen_epochs=min(cfg.train.frozen_epochs, 2),
        epochs=min(cfg.train.epochs, 3),
        device=str(runtime.device),
    )
    log.info(
        "training on shuffled labels for the data randomisation test (%d + %d epochs)",
        short.frozen_epochs,
        short.epochs,
    )
    model, _ = create_seeded_model(cfg, n_classes, seed)  # the same network as the run's (drop_rate too)
    model, _ = train_model(dataclasses.replace(cfg, train=short), train, prepared.sets["val"], n_classes, model=model)
    return model


__all__ = [
    "evaluate_run",
    "compute_evaluation",
    "write_evaluation",
    "sanity_methods",
    "Evaluation",
    "DEFAULT_SANITY_METHODS",
]
