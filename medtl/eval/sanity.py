"""Saliency sanity checks (Adebayo et al., 2018): do the maps depend on what the model learned?

- **Model-parameter randomisation, cascading from the head**: re-initialise the head, then each
  encoder layer group from the top down, and compare each map with the trained model's.
- **Data randomisation**: compare with the maps of the same architecture trained on shuffled labels.

The comparison is Spearman's rank correlation of the two maps (mean over the images given).
A method whose maps stay correlated above :data:`PASS_THRESHOLD` once the whole model is
randomised is flagged as untrustworthy for this model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr

from medtl.models.groups import encoder_groups
from medtl.predict.forward import forward_logits
from medtl.runtime import Runtime

PASS_THRESHOLD = 0.5  # maps of a fully randomised model must correlate below this with the trained model's


@dataclass
class SanityResult:
    """Rank correlations between trained and randomised maps, and the verdict."""

    method: str
    cascade: list[dict] = field(default_factory=list)  # {"randomised": "head + 2 groups", "spearman": r}
    data_randomisation: float | None = None  # correlation with a model trained on shuffled labels
    passed: bool = True
    verdict: str = ""

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "cascade": self.cascade,
            "data_randomisation": self.data_randomisation,
            "passed": self.passed,
            "verdict": self.verdict,
        }


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (0 where either is constant)."""
    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _reinitialise(modules: Sequence[torch.nn.Module], seed: int) -> None:
    torch.manual_seed(seed)
    for m in modules:
        for sub in m.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                sub.reset_running_stats()


def _group_modules(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """The model's modules in layer groups, head first, then encoder groups from the top down."""
    owner = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner[id(p)] = m
    groups = [[model.get_classifier()]]
    for params in reversed(encoder_groups(model)):
        groups.append(list({id(owner[id(p)]): owner[id(p)] for p in params}.values()))
    return groups


def run_sanity_checks(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    saliency_fn: Callable,
    method: str,
    random_label_model: torch.nn.Module | None = None,
    seed: int = 0,
    runtime: Runtime | None = None,
) -> SanityResult:
    """Cascading randomisation (and, given ``random_label_model``, data randomisation) for one method.

    ``saliency_fn(model, x, class_idx) -> (H, W) map``; ``inputs`` are (1, C, H, W) tensors. Maps
    are computed for the class the trained model predicts, so only the model changes. Models run
    on ``runtime`` (default: the model's device, fp32).
    """
    runtime = Runtime.of(model, runtime).replace(tta=False)
    model = copy.deepcopy(model).eval()
    targets = [int(forward_logits(model, x, runtime).argmax(dim=1)[0]) for x in inputs]
    reference = [saliency_fn(model, x, t) for x, t in zip(inputs, targets)]
    result = SanityResult(method=method)
    groups = _group_modules(model)
    for k, modules in enumerate(groups):
        _reinitialise(modules, seed + k)
        maps = [saliency_fn(model, x, t) for x, t in zip(inputs, targets)]
        r = float(np.mean([rank_correlation(a, b) for a, b in zip(reference, maps)]))
        label = "head" if k == 0 else f"head + top {k} encoder group{'s' if k > 1 else ''}"
        result.cascade.append({"randomised": label, "spearman": round(r, 4)})
    if random_label_model is not None:
        shuffled = runtime.prepare(copy.deepcopy(random_label_model)).eval()
        maps = [saliency_fn(shuffled, x, t) for x, t in zip(inputs, targets)]
        result.data_randomisation = round(float(np.mean([rank_correlation(a, b) for a, b in zip(reference, maps)])), 4)
    final = result.cascade[-1]["spearman"]
    worst = max([final] + ([result.data_randomisation] if result.data_randomisation is not None else []))
    result.passed = worst < PASS_THRESHOLD
    tests = "model and label randomisation" if result.data_randomisation is not None else "model randomisation"
    result.verdict = (
        f"passes ({tests}): maps change when the model is randomised (rank correlation {worst:.2f} < {PASS_THRESHOLD})"
        if result.passed
        else f"UNTRUSTWORTHY for this model: maps barely change when the model is randomised "
        f"(rank correlation {worst:.2f} >= {PASS_THRESHOLD})"
    )
    if result.data_randomisation is None:
        result.verdict += "; the label randomisation test was not run"
    return result
