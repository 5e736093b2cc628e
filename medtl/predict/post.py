"""From a model's outputs to an answer: probabilities, slices aggregated into a study, and the
:class:`Decision` that chooses a class (the one place a class is chosen)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from medtl.data.manifest import FINDINGS_SEPARATOR, NO_FINDING
from medtl.metrics import choose_threshold, fit_temperature

DecisionSource = Literal["training", "evaluation"]  # where a decision was chosen (both on validation data)


def aggregate_slices(probs: np.ndarray, how: str, k: int = 3) -> np.ndarray:
    """A study's class probabilities from its slices' (n_slices, n_classes) probabilities."""
    if len(probs) == 1:
        return probs[0]
    if how == "mean":
        return probs.mean(axis=0)
    if how == "max":  # each class its highest slice score, renormalised
        p = probs.max(axis=0)
        return p / p.sum()
    top = np.sort(probs, axis=0)[-min(k, len(probs)) :]  # top-k mean per class, renormalised
    p = top.mean(axis=0)
    return p / p.sum()


def aggregate_studies(
    labels: np.ndarray, probs: np.ndarray, studies: np.ndarray, how: str = "mean", k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One row per study (in order of first appearance) from per-input labels and probabilities."""
    order = list(dict.fromkeys(np.asarray(studies).tolist()))
    if len(order) == len(studies):
        return labels, probs
    return (
        np.asarray([labels[studies == s][0] for s in order]),
        np.stack([aggregate_slices(probs[studies == s], how, k) for s in order]),
    )


def to_probabilities(logits, temperature=1.0, multi_label: bool = False) -> torch.Tensor:
    """Probabilities of logits at ``temperature``: softmax over the classes, or for a multi-label model a
    sigmoid per finding (each finding present or not, independently)."""
    z = torch.as_tensor(logits) / temperature
    return z.sigmoid() if multi_label else z.softmax(dim=1)


@dataclass
class Logits:
    """A model's outputs over a data set, one row per model input, in the data set's order."""

    labels: np.ndarray  # (n,) int: each input's label; multi-label (n, findings) of 0/1
    logits: np.ndarray  # (n, classes) float32
    studies: np.ndarray  # (n,): the study each input belongs to (several inputs per study in "slices" modes)
    aggregation: tuple[str, int] = ("mean", 3)  # how a study's score is made from its inputs' (rule, k)

    def study_probs(self, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities), one row per study: softmax(logits / temperature) (multi-label: a
        sigmoid per finding), then aggregated."""
        probs = to_probabilities(self.logits, temperature, self.multi_label).numpy()
        return aggregate_studies(self.labels, probs, self.studies, *self.aggregation)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2


@dataclass(frozen=True)
class Judgement:
    """One comparison a decision made, for words and figures: a class's or a finding's probability, and the
    threshold it was held against (None: the decision was the most probable class)."""

    name: str  # the class or finding judged
    probability: float  # its (calibrated, where the decision has a temperature) probability
    threshold: float | None  # the decision threshold it was held against; None for the most probable class
    decided: bool  # the class was chosen / the finding is present

    def comparison(self, digits: int = 2) -> str:
        """``0.42 ≥ 0.40`` (``0.42`` without a threshold), with enough digits that the two never print alike."""
        if self.threshold is None:
            return f"{self.probability:.{digits}f}"
        while digits < 6 and f"{self.probability:.{digits}f}" == f"{self.threshold:.{digits}f}":
            digits += 1  # never "0.52 < 0.52"
        sign = "≥" if self.probability >= self.threshold else "<"
        return f"{self.probability:.{digits}f} {sign} {self.threshold:.{digits}f}"


@dataclass(frozen=True)
class Decision:
    """How an answer is chosen from a model's logits: the one place a class is chosen.

    Logits are divided by ``temperature`` (calibration), then turned into probabilities (softmax; a sigmoid
    per finding for a multi-label model). A binary model with an operating point decides its positive class
    (the finding it looks for: ``positive``, by default the second class) when that class's probability is at or
    above ``threshold``, else the other; a model of more classes, or one without an
    operating point, answers the most probable class. A multi-label model decides each finding present when
    its probability is at or above its threshold (0.5 where none was chosen). Training chooses a decision on
    validation data (``source`` "training", saved with the weights); ``medtl evaluate`` chooses its own
    (``source`` "evaluation", saved beside its report); a run's answers use training's unless asked otherwise.
    """

    class_names: tuple[str, ...]  # the classes (multi-label: the findings), in the model's output order
    multi_label: bool = False  # a sigmoid per finding, each decided on its own
    temperature: float | None = None  # calibration of the logits (None: not calibrated, i.e. 1)
    threshold: float | None = None  # binary models: the operating point on the positive class's probability
    thresholds: tuple[float, ...] | None = None  # multi-label models: one threshold per finding
    rule: str = ""  # how the threshold(s) were chosen, in words
    rules: tuple[str, ...] = ()  # multi-label models: each finding's rule
    source: DecisionSource = "training"  # which step chose it (on validation data either way)
    positive: int = 1  # binary models: the index of the positive class (the finding; sensitivity is stated for it)

    @property
    def basis(self) -> str:
        """How the answer is decided, in a word or two: "operating point", "argmax", "operating points" or
        "0.5 per finding"."""
        if self.multi_label:
            return "operating points" if self.thresholds else "0.5 per finding"
        return "operating point" if self.threshold is not None else "argmax"

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None

    @property
    def finding(self) -> str:
        """Binary models: the positive class's name (what a threshold, a sensitivity and the SR's finding are of)."""
        return self.class_names[self.positive]

    def positive_view(self, labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Binary models: (1 where the label is the positive class else 0, the positive class's probability):
        what binary metrics at this decision's operating point are computed on."""
        return (np.asarray(labels) == self.positive).astype(int), np.asarray(probs)[:, self.positive]

    @property
    def finding_thresholds(self) -> tuple[float, ...]:
        """Multi-label models: each finding's threshold (0.5 where none was chosen)."""
        return self.thresholds or (0.5,) * len(self.class_names)

    def probabilities(self, logits) -> np.ndarray:
        """(n, classes) probabilities of (n, classes) logits: calibrated, then softmax (multi-label: sigmoid)."""
        return to_probabilities(logits, self.temperature or 1.0, self.multi_label).numpy()

    def choose(self, probs: np.ndarray) -> np.ndarray:
        """The decisions for (n, classes) probabilities: (n,) class indices, or for a multi-label model (n,
        findings) of 0/1 (present or not)."""
        probs = np.asarray(probs)
        if self.multi_label:
            return (probs >= np.asarray(self.finding_thresholds)[None, :]).astype(int)
        if self.threshold is not None:
            return np.where(probs[:, self.positive] >= self.threshold, self.positive, 1 - self.positive)
        return probs.argmax(axis=1)

    def findings(self, p: np.ndarray) -> list[str]:
        """Multi-label models: the findings decided present for one row of probabilities."""
        chosen = self.choose(np.asarray(p)[None])[0]
        return [c for c, v in zip(self.class_names, chosen) if v]

    def label(self, p: np.ndarray) -> str:
        """The answer for one row of probabilities: a class name, or for a multi-label model the findings
        decided present joined by "|" ("No Finding" for none)."""
        if self.multi_label:
            return FINDINGS_SEPARATOR.join(self.findings(p)) or NO_FINDING[0].title()
        return self.class_names[int(self.choose(np.asarray(p)[None])[0])]

    def judgements(self, probabilities: dict[str, float]) -> list[Judgement]:
        """What the decision compared for one answer (``probabilities``: class name -> probability): each
        finding against its threshold; the positive class against the operating point; or the most probable
        class, with no threshold."""
        if self.multi_label:
            return [
                Judgement(c, probabilities[c], t, probabilities[c] >= t)
                for c, t in zip(self.class_names, self.finding_thresholds)
            ]
        if self.threshold is not None:
            p1 = probabilities[self.finding]
            return [Judgement(self.finding, p1, self.threshold, p1 >= self.threshold)]
        best = max(probabilities, key=lambda c: probabilities[c])
        return [Judgement(best, probabilities[best], None, True)]

    def describe(self) -> str:
        """Where the decision comes from, in words (for pages, reports and DICOM results)."""
        if self.multi_label:
            return (
                "each finding's probability against its threshold chosen on validation data"
                if self.thresholds
                else "each finding's probability against 0.5 (no thresholds were chosen for this model)"
            )
        if self.threshold is not None:
            return (
                f"the probability of {self.finding} against the decision threshold chosen on validation "
                f"data ({self.rule})"
            )  # (the number: Judgement.comparison, with the digits it needs)
        return "the most probable class (no decision threshold was chosen for this model)"

    @property
    def operating_point(self) -> dict | None:
        """The operating point as saved with a model's weights: ``{"threshold", "rule", "positive"}`` (binary;
        ``positive`` the positive class's name), ``{"thresholds", "rules", "rule"}`` (multi-label), or None."""
        if self.multi_label:
            return (
                None
                if self.thresholds is None
                else {"thresholds": list(self.thresholds), "rules": list(self.rules), "rule": self.rule}
            )
        if self.threshold is None:
            return None
        return {"threshold": self.threshold, "rule": self.rule, "positive": self.finding}

    def to_record(self) -> dict:
        """A JSON-ready record (:meth:`from_record` reads it back)."""
        return {"source": self.source, "temperature": self.temperature, "operating_point": self.operating_point}

    @classmethod
    def from_record(
        cls,
        class_names,
        multi_label: bool,
        temperature: float | None,
        operating_point: dict | None,
        source: DecisionSource = "training",
    ) -> Decision:
        """The decision of a saved temperature and operating point (see :attr:`operating_point`). An operating
        point is used only where it applies: a binary threshold for two classes, thresholds per finding. A binary
        operating point saved without its positive class (before it was named) is on the second class."""
        op = operating_point or {}
        names = tuple(class_names)
        if multi_label:
            thresholds = op.get("thresholds")
            return cls(
                names,
                True,
                temperature,
                None,
                None if thresholds is None else tuple(map(float, thresholds)),
                str(op.get("rule", "")),
                tuple(op.get("rules") or ()),
                source,
            )
        threshold = op.get("threshold") if len(names) == 2 else None
        return cls(
            names,
            False,
            temperature,
            None if threshold is None else float(threshold),
            None,
            str(op.get("rule", "")),
            (),
            source,
            positive_index(names, op.get("positive")),
        )

    @classmethod
    def fit(
        cls,
        val: Logits,
        class_names,
        rule: str = "youden",
        source: DecisionSource = "training",
        positive: str | int | None = None,
    ) -> Decision:
        """The decision chosen on validation logits: the temperature that minimises the validation NLL, then
        for a binary model the threshold on the calibrated probability of the ``positive`` class (a name or an
        index; default the second class) by ``rule``
        (:func:`medtl.metrics.choose_threshold`; none for more classes: the most probable class). Multi-label:
        one temperature for all findings, and a threshold per finding; a finding whose validation studies are
        all of one kind keeps 0.5 (said in its rule)."""
        names = tuple(class_names)
        temperature = fit_temperature(val.logits, val.labels)
        y, p = val.study_probs(temperature)
        if val.multi_label:
            thresholds, rules = [], []
            for k in range(y.shape[1]):
                if len(np.unique(y[:, k])) < 2:
                    thresholds.append(0.5)
                    rules.append("0.5: the validation studies are all of one kind for this finding")
                    continue
                t, why = choose_threshold(y[:, k], p[:, k], rule)
                thresholds.append(t)
                rules.append(why)
            return cls(names, True, temperature, None, tuple(thresholds), rule, tuple(rules), source)
        if len(names) != 2:
            return cls(names, False, temperature, source=source)
        pos = positive_index(names, positive)
        threshold, why = choose_threshold((y == pos).astype(int), p[:, pos], rule)
        return cls(names, False, temperature, threshold, None, why, (), source, pos)

    def replace(self, **changes) -> Decision:
        return dataclasses.replace(self, **changes)


def positive_index(class_names, positive: str | int | None) -> int:
    """The index of a binary model's positive class, named or given by index; None: the second class."""
    names = tuple(class_names)
    if positive is None:
        return 1
    if isinstance(positive, int) and not isinstance(positive, bool) and positive in (0, 1):
        return positive
    if positive in names:
        return names.index(positive)
    raise ValueError(f"positive class {positive!r} is not one of the classes {', '.join(map(repr, names))}")


__all__ = [
    "positive_index",
    "Decision",
    "DecisionSource",
    "Judgement",
    "Logits",
    "to_probabilities",
    "aggregate_slices",
    "aggregate_studies",
]
