"""How good a run's model is, in the words a clinician reads beside every answer: test AUC with its 95 % CI,
sensitivity and specificity for the finding at the operating point, the number of test patients, and badges
for what is missing (no evaluation, a small test set) or wrong (below the quality floor: the model is not fit
to show answers).

The figures come from ``medtl evaluate``'s record where the run has one (the CI a patient bootstrap), else from
the training run's own test split (``metrics.json``; the CI then Hanley & McNeil's approximation from the
test's class counts, said so)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from medtl.run import RunDir

QUALITY_FLOOR = 0.6  # default: a model whose test AUC's 95 % CI reaches below this is not fit to show answers
FLOOR_ENV = "MEDTL_QUALITY_FLOOR"  # the floor for a served page (`medtl serve --quality-floor` sets it)
SMALL_TEST = 50  # fewer test patients than this: the figures are said to be uncertain


def quality_floor(value: float | None = None) -> float:
    """The quality floor: ``value``, else ``MEDTL_QUALITY_FLOOR``, else :data:`QUALITY_FLOOR` (0 turns it off)."""
    if value is not None:
        return float(value)
    raw = os.environ.get(FLOOR_ENV)
    try:
        return float(raw) if raw else QUALITY_FLOOR
    except ValueError:
        from medtl.errors import ConfigError

        raise ConfigError(None, f"{FLOOR_ENV}={raw!r} is not a number", "an AUC between 0 and 1") from None


def hanley_mcneil_ci(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """An approximate 95 % interval of an AUC from its class counts (Hanley & McNeil 1982, normal approximation),
    clipped to [0, 1]. A perfect (or null) AUC is taken half a pair from the edge for the variance, so that a
    perfect score on a handful of cases does not get an interval of zero width."""
    edge = 0.5 / (n_pos * n_neg)
    a = min(max(auc, edge), 1 - edge)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    half = 1.96 * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


@dataclass(frozen=True)
class ModelQuality:
    """A run's test figures and what they allow."""

    auc: float | None = None
    auc_ci: tuple[float, float] | None = None
    ci_method: str = ""  # how the interval was made, in words
    finding: str | None = None  # the positive class the sensitivity is of (binary models)
    sensitivity: float | None = None  # at the operating point, for the finding
    specificity: float | None = None
    n_patients: int | None = None  # test patients
    evaluated: bool = False  # figures from `medtl evaluate` (else from the training run's test split)
    floor: float = QUALITY_FLOOR

    @property
    def fit(self) -> bool:
        """False where the AUC's interval reaches below the floor (no interval known: not judged, True)."""
        return self.auc_ci is None or self.floor <= 0 or self.auc_ci[0] >= self.floor

    @property
    def small(self) -> bool:
        return self.n_patients is not None and self.n_patients < SMALL_TEST

    def badges(self) -> list[str]:
        """Short warnings, most serious first."""
        out = []
        if not self.fit:
            out.append("NOT FIT TO SHOW ANSWERS")
        if not self.evaluated:
            out.append("NOT EVALUATED")
        if self.small:
            out.append(f"SMALL TEST SET ({self.n_patients} patients)")
        return out

    def sentence(self) -> str:
        """The figures in one sentence (``""`` where the run has none)."""
        if self.auc is None:
            return "No test figures are recorded for this model."
        ci = f" (95 % CI {self.auc_ci[0]:.2f}–{self.auc_ci[1]:.2f}{self.ci_method})" if self.auc_ci else ""
        out = f"Test AUC {self.auc:.2f}{ci}"
        if self.sensitivity is not None and self.specificity is not None:
            of = f" for {self.finding}" if self.finding else ""
            out += (
                f"; at its decision threshold, sensitivity {self.sensitivity:.2f} and specificity "
                f"{self.specificity:.2f}{of}"
            )
        if self.n_patients is not None:
            out += f"; {self.n_patients} test patients"
        return out + "."

    def not_fit_text(self) -> str:
        """Why no answer is shown."""
        assert self.auc_ci is not None
        return (
            f"**This model is not fit to show answers**: the 95 % interval of its test AUC reaches down to "
            f"{self.auc_ci[0]:.2f}, below the quality floor {self.floor:.2f} (an AUC of 0.5 is a coin flip). "
            "Ask whoever trained it for a better-tested model."
        )

    def summary(self) -> str:
        """Badges, then the sentence: what the page shows beside every answer."""
        badges = " ".join(f"**[{b}]**" for b in self.badges())
        return f"{badges} {self.sentence()}".strip()


def model_quality(run_dir, finding: str | None = None, floor: float | None = None) -> ModelQuality:
    """The quality of the run in ``run_dir`` (see the module's docstring); ``finding``: the positive class's
    name for a binary model (its sensitivity and specificity are shown)."""
    run = RunDir(run_dir)
    record = run.read_json(f"{RunDir.EVALUATION}/{RunDir.EVALUATION_RECORD}", {})
    evaluated = bool(record.get("auc"))
    ci: tuple[float, float] | None = None
    if evaluated:  # medtl evaluate's figures
        auc = record["auc"].get("auc")
        low_high = record["auc"].get("auc_ci")
        ci = (float(low_high[0]), float(low_high[1])) if low_high else None
        method, op, n = ", patient bootstrap", record.get("operating_point") or {}, record.get("n_test_patients")
    else:  # the training run's own test split
        test = run.read_json(RunDir.METRICS, {}).get("test") or {}
        auc = test.get("auc") if isinstance(test.get("auc"), (int, float)) else None
        counts = list((test.get("label_counts") or {}).values())
        if auc is not None and len(counts) == 2 and min(counts) > 0:
            ci = hanley_mcneil_ci(float(auc), counts[1], counts[0])
        method = ", approximate: from the class counts" if ci else ""
        op, n = test.get("decision") or {}, test.get("n_patients")
    return ModelQuality(
        auc=auc,
        auc_ci=ci,
        ci_method=method,
        finding=op.get("positive", finding),
        sensitivity=op.get("sensitivity"),
        specificity=op.get("specificity"),
        n_patients=n,
        evaluated=evaluated,
        floor=quality_floor(floor),
    )
