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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.data.dataset import study_index
from medtl.data.manifest import label_text
from medtl.errors import RunError
from medtl.eval.card import model_card, model_card_markdown, report_html
from medtl.eval.figures import evaluation_figures
from medtl.eval.sanity import run_sanity_checks
from medtl.explain import METHODS, compute_saliency, explain_input
from medtl.metrics import bootstrap_ci, compute_auc_ci, compute_binary_metrics, compute_ece, compute_nll
from medtl.predict.forward import extract_features, predict_logits
from medtl.predict.ood import foreign_check, study_scores
from medtl.predict.post import Decision
from medtl.predict.predictor import Predictor
from medtl.run import RunDir, SavedRun, load_saved_run
from medtl.runtime import Runtime, inference_precision, resolve_device
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


def compute_evaluation(
    saved: SavedRun,
    cfg,
    prepared,
    runtime: Runtime,
    n_boot: int = 1000,
    operating_point: str = "youden",
    methods: tuple[str, ...] = METHODS,
    sanity_images: int = 3,
    data_randomisation: bool = True,
    seed: int = 0,
) -> Evaluation:
    """Measure a saved run on ``prepared``'s test split: every choice (temperature, operating point) is
    made on the validation split; intervals resample patients."""
    model, pre, class_names = saved.model, saved.preprocessing, saved.class_names
    _, val_ds, test_ds = prepared.datasets(cfg.data, pre)
    val_logits, test_logits = (predict_logits(model, ds, runtime, 64) for ds in (val_ds, test_ds))
    decision = Decision.fit(val_logits, class_names, operating_point, source="evaluation")
    test_y, test_p_raw = test_logits.study_probs()
    _, test_p = test_logits.study_probs(decision.temperature or 1.0)
    patients = np.asarray([s["patient_id"] for s in prepared.sets["test"]])
    result: dict = {
        "run": saved.run_dir.name,
        "date": datetime.date.today().isoformat(),
        "data": Path(cfg.data.path).name,
        "n_test_images": len(test_y),
        "n_test_patients": len(set(patients.tolist())),
        "class_names": class_names,
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
            **_binary_metrics_ci(test_y, test_p[:, 1], decision.threshold, patients, n_boot, seed),
        }
    result["subgroups"] = _subgroups(prepared.sets["test"], test_y, test_p, patients, n_boot, seed)
    inputs, cases = _cases(
        model, test_ds, prepared.sets["test"], test_y, test_p, decision.choose(test_p), class_names, runtime
    )
    shuffled = _train_on_shuffled_labels(cfg, prepared, len(class_names), seed, runtime) if data_randomisation else None
    result["saliency_sanity"] = []
    for method in methods:
        res = run_sanity_checks(
            model,
            inputs[:sanity_images],
            lambda m, x, c, meth=method: compute_saliency(m, x, c, meth, runtime=runtime),
            method,
            shuffled,
            seed,
            runtime=runtime,
        )
        result["saliency_sanity"].append(res.to_dict())
        log.info("saliency %s: %s", method, res.verdict)
    return Evaluation(result, class_names, test_y, test_p_raw, test_p, patients, decision, cases)


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
            lambda i, k=key: compute_binary_metrics(labels[i], scores[i], threshold)[k], patients, n_boot, seed
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
    methods: tuple[str, ...] = METHODS,
    sanity_images: int = 3,
    data_randomisation: bool = True,
    seed: int = 0,
    device: str = "auto",
    foreign: list[str | Path] | None = None,
) -> dict:
    """Evaluate a run on its test split (or on ``data``); write the report, figures, model card and the
    decision it chose (see module doc) into ``RUN/evaluation/``. Models run on ``device``.

    ``foreign``: files unlike the training data (other modalities, body parts, photographs): the report
    gives the out-of-distribution detector's AUROC against the test studies, and its refusal rates."""
    run = RunDir.open(run_dir)
    saved = load_saved_run(run.path)
    cfg = saved.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    runtime = Runtime(resolve_device(device), inference_precision(None), tta=cfg.train.tta)
    runtime.prepare(saved.model)
    manifest = read_data(cfg.data)
    if manifest.class_names != saved.class_names:
        raise RunError(f"{cfg.data.path}: classes {manifest.class_names} differ from the model's {saved.class_names}")
    prepared = prepare_data(cfg.data, saved.preprocessing, cfg.train.seed, manifest)
    ev = compute_evaluation(
        saved, cfg, prepared, runtime, n_boot, operating_point, methods, sanity_images, data_randomisation, seed
    )
    ev.result["ood"] = _ood_check(run, saved, cfg, prepared, foreign or [], device)
    write_evaluation(
        run,
        ev,
        model_card(run, ev.result, prepared, cfg, saved),
        evaluation_figures(ev, run / RunDir.HISTORY, min(n_boot, 300), seed),
    )
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
    predictor = Predictor(run.path, device=device)
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


__all__ = ["evaluate_run", "compute_evaluation", "write_evaluation", "Evaluation"]
