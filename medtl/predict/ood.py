"""Refusing what a model never saw, by content: an out-of-distribution score on the encoder's features.

A fine-tuned classifier answers every input with a class, confidently or not: a head CT, a knee MR or
a photograph of a cat all get a "probability". :class:`OODDetector` measures how far an input's
encoder features (the pooled vector the head sees) lie from the training set's:

- ``"knn"`` (default; Sun et al., ICML 2022, "Out-of-distribution detection with deep nearest
  neighbors"): the distance of the L2-normalised feature vector to its k-th nearest neighbour
  among the training images' normalised features. It needs no distributional assumption and
  works with the few hundred images medtl is made for.
- ``"mahalanobis"`` (Lee et al., NeurIPS 2018): the smallest Mahalanobis distance to a class mean,
  with one shared covariance estimated with Ledoit-Wolf shrinkage (scikit-learn), since a few
  hundred images cannot estimate a 1280-dimensional covariance.

The refusal threshold is set on the validation studies, which the training never saw, so that about
1 in 100 in-distribution studies is refused (default ``train.ood_quantile`` 0.99; a tolerance bound
widens it where the validation set is small: :func:`tolerance_threshold`). A study of
several inputs (a volume read slice by slice) scores the median of its inputs' scores.
``medtl train`` fits the detector and saves it next to the model (``ood.safetensors``);
:class:`medtl.predict.Predictor` refuses inputs over the threshold, and ``medtl evaluate``
reports its AUROC against foreign images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from medtl.errors import MedtlInputError, RunError
from medtl.run import RunDir

OOD_FILE = RunDir.OOD
METHODS = ("knn", "mahalanobis")
MAX_BANK = 20_000  # training feature vectors kept for the k-NN score (a random subset beyond that)


def _normalise(f: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(f.float(), dim=1)


@dataclass
class OODDetector:
    """Feature-space distance to the training set, and the threshold above which an input is refused."""

    method: str
    threshold: float  # scores above it are refused
    quantile: float  # of the validation scores that set the threshold
    k: int = 5  # "knn": the neighbour whose distance is the score
    bank: torch.Tensor | None = None  # "knn": (n, d) normalised training features
    means: torch.Tensor | None = None  # "mahalanobis": (classes, d)
    precision: torch.Tensor | None = None  # "mahalanobis": (d, d) inverse of the shared covariance
    n_train: int = 0
    val_scores: tuple[float, ...] = ()  # for the record (percentiles in the model card)

    @classmethod
    def fit(
        cls, train_features: torch.Tensor, train_labels: torch.Tensor, method: str = "knn", k: int = 5, seed: int = 0
    ) -> OODDetector:
        """A detector of the training features (threshold unset: call :meth:`calibrate` on validation scores)."""
        if method not in METHODS:
            raise ValueError(f"unknown out-of-distribution method {method!r}; one of {', '.join(METHODS)}")
        f = train_features.detach().float().cpu()
        det = cls(method=method, threshold=float("inf"), quantile=1.0, k=max(1, min(k, len(f))), n_train=len(f))
        if method == "knn":
            bank = _normalise(f)
            if len(bank) > MAX_BANK:
                bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:MAX_BANK]]
            det.bank = bank.contiguous()
        else:
            labels = train_labels.detach().cpu().long()
            classes = sorted(set(labels.tolist()))
            means = torch.stack([f[labels == c].mean(0) for c in classes])
            centred = torch.cat([f[labels == c] - means[i] for i, c in enumerate(classes)])
            lw = LedoitWolf().fit(centred.double().numpy())
            det.means, det.precision = means, torch.as_tensor(lw.precision_, dtype=torch.float32)
        return det

    def score(self, features: torch.Tensor) -> np.ndarray:
        """One score per input (n, d) -> (n,): larger is further from the training set."""
        f = features.detach().float().cpu()
        if self.method == "knn":
            if self.bank is None:
                raise RunError(f"the k-NN out-of-distribution detector has no feature bank (a damaged {OOD_FILE}?)")
            d = torch.cdist(_normalise(f), self.bank)  # (n, bank)
            k = min(self.k, d.shape[1])
            return d.topk(k, dim=1, largest=False).values[:, -1].numpy()
        if self.means is None or self.precision is None:
            raise RunError(
                "the Mahalanobis out-of-distribution detector has no class means or precision matrix "
                f"(a damaged {OOD_FILE}?)"
            )
        diff = f[:, None, :] - self.means[None]  # (n, classes, d)
        m = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff).clamp_min(0).sqrt()
        return m.min(dim=1).values.numpy()

    def calibrate(self, val_scores: np.ndarray, quantile: float = 0.99) -> OODDetector:
        """Set the threshold at ``quantile`` of the validation studies' scores (:func:`tolerance_threshold`)."""
        val_scores = np.asarray(val_scores, float)
        val_scores = val_scores[np.isfinite(val_scores)]
        if val_scores.size == 0:
            raise ValueError("no validation scores to set the out-of-distribution threshold")
        self.threshold = tolerance_threshold(val_scores, quantile)
        self.quantile = float(quantile)
        self.val_scores = tuple(round(float(v), 6) for v in val_scores)
        return self

    def refuses(self, study_score: float) -> bool:
        return not np.isfinite(study_score) or study_score > self.threshold

    def describe(self) -> dict:
        """What the model card and ``metrics.json`` say of the detector."""
        return {
            "method": self.method,
            "k": self.k if self.method == "knn" else None,
            "threshold": round(self.threshold, 6),
            "quantile": self.quantile,
            "n_train": self.n_train,
            "n_val": len(self.val_scores),
        }

    def save(self, path: str | Path) -> Path:
        tensors = {
            k: v.contiguous()
            for k, v in (("bank", self.bank), ("means", self.means), ("precision", self.precision))
            if v is not None
        }
        meta = {
            "format": "medtl-ood",
            "method": self.method,
            "threshold": json.dumps(self.threshold),
            "quantile": json.dumps(self.quantile),
            "k": str(self.k),
            "n_train": str(self.n_train),
            "val_scores": json.dumps(list(self.val_scores)),
        }
        save_file(tensors, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> OODDetector:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is no mapping
        except Exception as e:
            raise RunError(f"{path}: not a readable out-of-distribution file ({type(e).__name__})") from None
        if meta.get("format") != "medtl-ood" or meta.get("method") not in METHODS:
            raise RunError(f"{path}: not a medtl out-of-distribution file")
        return cls(
            method=meta["method"],
            threshold=json.loads(meta["threshold"]),
            quantile=json.loads(meta["quantile"]),
            k=int(meta["k"]),
            n_train=int(meta["n_train"]),
            val_scores=tuple(json.loads(meta["val_scores"])),
            **tensors,
        )


def tolerance_threshold(scores: np.ndarray, quantile: float = 0.99, confidence: float = 0.9) -> float:
    """A threshold that ``quantile`` of in-distribution scores stay under, with ``confidence``, estimated
    from a few validation scores.

    The empirical quantile of 20 scores is about their maximum, and about 1 in 20 new in-distribution
    inputs would lie above it, not 1 in 100. So the threshold is the larger of the empirical quantile
    and a one-sided normal tolerance bound (Natrella's approximation of the tolerance factor) around
    the median, with the spread taken robustly (1.4826 × the median absolute deviation), so that one
    near-duplicate image scoring 0 cannot blow the bound up. With many scores both agree; with few,
    the bound is wider.
    """

    scores = np.asarray(scores, float)
    empirical = float(np.quantile(scores, quantile))
    n = len(scores)
    centre = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - centre)))
    if spread == 0 and n > 1:
        spread = float(scores.std(ddof=1))
    if n < 3 or spread == 0 or not 0 < quantile < 1:
        return empirical
    zp, zg = NormalDist().inv_cdf(quantile), NormalDist().inv_cdf(confidence)
    a = 1 - zg**2 / (2 * (n - 1))
    b = zp**2 - zg**2 / n
    k = (zp + np.sqrt(max(zp**2 - a * b, 0.0))) / a
    return max(empirical, centre + k * spread)


def study_scores(input_scores: np.ndarray, studies: np.ndarray) -> np.ndarray:
    """The median input score of each study, in the order studies first appear."""
    input_scores, studies = np.asarray(input_scores), np.asarray(studies)
    _, first = np.unique(studies, return_index=True)
    order = studies[np.sort(first)]
    return np.asarray([np.median(input_scores[studies == s]) for s in order])


def foreign_check(predictor, in_scores: np.ndarray, foreign: list[str | Path]) -> dict:
    """How well a run's detector tells its in-distribution test studies (``in_scores``) from
    ``foreign`` files (other modalities, other body parts, photographs): the AUROC of the content
    score alone, and how many of each the predictor refuses in all (header checks and content).

    A foreign file that cannot be read at all is listed as unreadable and left out of the AUROC.
    """
    det = predictor.ood
    if det is None:
        return {"measured": False, "why": "the run has no out-of-distribution detector (train.ood off or an older run)"}
    rows = []
    for f in foreign:
        try:
            scan = predictor.read(f)
            pred = predictor.predict(scan)
            # a refusal from the header comes before the model runs: the content score needs a second pass
            score = pred.ood_score if pred.ood_score is not None else predictor.predict(scan, check=False).ood_score
            refusal = pred.refused
            rows.append({"file": Path(f).name, "score": score, "refused": refusal is not None, "reason": refusal})
        except MedtlInputError as e:
            rows.append({"file": Path(f).name, "score": None, "refused": True, "reason": f"unreadable: {e.problem}"})
    in_scores = np.asarray(in_scores, float)
    scored = [r["score"] for r in rows if r["score"] is not None]
    auroc = None
    if len(in_scores) and scored:
        y = np.r_[np.zeros(len(in_scores)), np.ones(len(scored))]
        auroc = float(roc_auc_score(y, np.r_[in_scores, scored]))
    return {
        "measured": True,
        "method": det.method,
        "threshold": det.threshold,
        "auroc": auroc,
        "n_in": len(in_scores),
        "n_foreign": len(rows),
        "in_refused_by_content": float(np.mean(in_scores > det.threshold)) if len(in_scores) else None,
        "foreign_refused": float(np.mean([r["refused"] for r in rows])) if rows else None,
        "foreign_refused_by_content": float(np.mean(np.asarray(scored) > det.threshold)) if scored else None,
        "foreign": rows,
    }


def load_detector(run_dir: str | Path) -> OODDetector | None:
    """A run's detector, or None for runs trained before medtl fitted one (or of 3D encoders)."""
    path = Path(run_dir) / OOD_FILE
    return OODDetector.load(path) if path.is_file() else None


__all__ = [
    "OODDetector",
    "load_detector",
    "foreign_check",
    "study_scores",
    "tolerance_threshold",
    "OOD_FILE",
    "METHODS",
]
