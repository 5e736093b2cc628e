"""Training: the fine-tuning loop, its strategies, and whole experiments."""

from medtl.train.experiment import run_experiment
from medtl.train.fit import FitResult, Stage, fit, plan_stages, predict_probs, set_trainable

__all__ = ["fit", "plan_stages", "Stage", "FitResult", "predict_probs", "set_trainable", "run_experiment"]
