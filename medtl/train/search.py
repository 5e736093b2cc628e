"""Training more than once and keeping the best: ``strategy: auto`` (each candidate strategy from the same
weights, the best on validation kept) and ``train.ensemble`` (several seeds averaged into one network by a
greedy weight-space soup chosen on validation). Both are given the function that trains one configuration
(:func:`medtl.train.fit`), so the loop itself knows neither."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from medtl.config import TrainConfig
from medtl.errors import ConfigError
from medtl.metrics import compute_auc
from medtl.models.peft import plain_state_dict
from medtl.predict.forward import predict_logits
from medtl.runtime import Runtime, distributed
from medtl.train.stages import auto_candidates
from medtl.train.trainer import FitResult, validation_loss

log = logging.getLogger("medtl.train")

TrainOne = Callable[[TrainConfig], FitResult]  # trains the model (in place) with one configuration


def validation_score(model: torch.nn.Module, val_ds, runtime: Runtime, batch_size: int = 32) -> float:
    """What training keeps epochs by: the validation AUC per study, or minus the validation loss where the AUC is
    undefined."""
    y, p = predict_logits(model, val_ds, runtime, batch_size).study_probs()
    auc = compute_auc(y, p)
    return auc if auc is not None else -validation_loss(y, p)


def fit_auto(
    model: torch.nn.Module, train_one: TrainOne, cfg: TrainConfig, multi_label: bool, on_improve: Callable | None
) -> FitResult:
    """``strategy: auto``: train each of :func:`auto_candidates` from the same starting weights and seed, and keep
    the one with the best validation score (AUC; the cheaper candidate, earlier in the list, on a tie). The
    candidates' scores and seconds are in the result (``candidates``) and in its reason; their epochs are in the
    history, each stage named ``candidate:stage``. The test split is never seen."""
    candidates = auto_candidates(cfg, multi_label)
    if not candidates:
        raise ConfigError(
            None,
            "train.auto_candidates leaves no strategy to try for this data",
            "strategies such as linear_probe, partial, fine_tune",
        )
    start = copy.deepcopy(plain_state_dict(model))
    best, history, scores = None, [], {}
    for name in candidates:
        model.load_state_dict(start)
        t0 = time.perf_counter()
        result = train_one(dataclasses.replace(cfg, strategy=name))
        seconds = time.perf_counter() - t0
        scores[name] = {
            "val_score": round(float(result.best_score), 4),
            "seconds": round(seconds, 1),
            "best_epoch": result.best_epoch,
        }
        history += [{**row, "stage": f"{name}:{row['stage']}"} for row in result.history]
        log.info("auto: candidate %s scored %.4f on validation in %.1fs", name, result.best_score, seconds)
        if best is None or result.best_score > best[1].best_score + 1e-9:
            best = (name, result, copy.deepcopy(plain_state_dict(model)))
    name, result, state = best
    model.load_state_dict(state)
    model.eval()
    if on_improve is not None and distributed()[0] == 0:
        on_improve(model, result.history[result.best_epoch - 1] if result.history else {})
    result.history, result.strategy, result.candidates = history, name, scores
    result.strategy_reason = (
        "chosen on validation among "
        + ", ".join(f"{c} {v['val_score']:.3f} ({v['seconds']:.0f} s)" for c, v in scores.items())
        + f"; {sum(v['seconds'] for v in scores.values()):.0f} s in all"
    )
    log.info("auto: %s (%s)", name, result.strategy_reason)
    return result


def average_states(states: list[dict]) -> dict:
    """The mean of state dicts (integer tensors, such as BatchNorm's batch counters, from the first)."""
    out = {}
    for k, v in states[0].items():
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
    return out


def _train_members(model, train_one: TrainOne, cfg: TrainConfig) -> list[tuple[int, FitResult, dict]]:
    """``train.ensemble`` trainings from the same starting weights, seeds ``seed`` .. ``seed + n - 1``: (seed,
    result, weights) each."""
    start = copy.deepcopy(plain_state_dict(model))
    members = []
    for k in range(cfg.ensemble):
        model.load_state_dict(start)
        seed = cfg.seed + k
        result = train_one(dataclasses.replace(cfg, seed=seed, ensemble=1))
        members.append((seed, result, copy.deepcopy(plain_state_dict(model))))
        log.info("ensemble: member seed %d scored %.4f on validation", seed, result.best_score)
    return members


def _greedy_soup(model, members, val_ds, runtime: Runtime, bs: int) -> tuple[list[int], float, list[dict]]:
    """Members in order of their validation score, each averaged in only where the average scores at least as
    well on validation: (the members kept, the soup's score, each step tried)."""
    order = sorted(range(len(members)), key=lambda i: -members[i][1].best_score)
    soup = [order[0]]
    model.load_state_dict(members[order[0]][2])
    best = validation_score(model, val_ds, runtime, bs)
    tried = [{"seeds": [members[order[0]][0]], "val_score": round(best, 4), "kept": True}]
    for i in order[1:]:
        model.load_state_dict(average_states([members[j][2] for j in soup + [i]]))
        score = validation_score(model, val_ds, runtime, bs)
        kept = score >= best - 1e-9
        tried.append({"seeds": [members[j][0] for j in soup + [i]], "val_score": round(score, 4), "kept": kept})
        if kept:
            soup.append(i)
            best = score
    return soup, best, tried


def _output_ensemble_auc(model, members, val_ds, runtime: Runtime, bs: int) -> float | None:
    """For the record: the validation AUC of averaging the members' probabilities instead of their weights."""
    probs = []
    for _, _, state in members:
        ref = copy.deepcopy(model)
        ref.load_state_dict(state)
        probs.append(predict_logits(ref, val_ds, runtime, bs).study_probs())
    return compute_auc(probs[0][0], np.mean([p for _, p in probs], axis=0))


def fit_soup(
    model: torch.nn.Module, train_one: TrainOne, val_ds, cfg: TrainConfig, on_improve: Callable | None
) -> FitResult:
    """``train.ensemble`` = n > 1: n trainings from the same starting weights with seeds ``seed`` .. ``seed + n - 1``,
    combined into one network by a greedy weight-space soup (Wortsman et al. 2022): members in order of their
    validation score, each one averaged in only where the average scores at least as well on validation. The
    result is one network (prediction costs what one model costs; training costs n). The members' scores, the
    soup's, and the score of averaging the members' outputs instead (an output ensemble, n times the prediction
    cost) are in ``result.soup``."""
    t_all = time.perf_counter()
    members = _train_members(model, train_one, cfg)
    history = [{**row, "stage": f"seed{seed}:{row['stage']}"} for seed, result, _ in members for row in result.history]
    runtime, bs = members[0][1].eval_runtime(), max(32, members[0][1].batch_size)
    soup, best, tried = _greedy_soup(model, members, val_ds, runtime, bs)
    model.load_state_dict(average_states([members[j][2] for j in soup]))
    output_auc = _output_ensemble_auc(model, members, val_ds, runtime, bs)
    model.eval()
    top_score = max(r.best_score for _, r, _ in members)
    result = members[soup[0]][1]
    result.history, result.best_score = history, best
    result.soup = {
        "members": [{"seed": seed, "val_score": round(float(r.best_score), 4)} for seed, r, _ in members],
        "ingredients": [members[j][0] for j in soup],
        "greedy_steps": tried,
        "soup_val_score": round(best, 4),
        "output_ensemble_val_score": None if output_auc is None else round(output_auc, 4),
        "training_seconds": round(time.perf_counter() - t_all, 1),
        "cost": f"{len(members)} trainings; prediction costs one model",
    }
    log.info(
        "ensemble: soup of seeds %s scores %.4f on validation (best member %.4f, output ensemble %s)",
        result.soup["ingredients"],
        best,
        top_score,
        result.soup["output_ensemble_val_score"],
    )
    if on_improve is not None and distributed()[0] == 0:
        on_improve(model, {})
    return result


__all__ = ["fit_auto", "fit_soup", "validation_score", "average_states", "TrainOne"]
