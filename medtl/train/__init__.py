"""Training: one ``fit()`` loop, strategies as stages, run folders, a learning-rate finder."""

from medtl.train.experiment import PreparedData, prepare_data, read_data, run_experiment
from medtl.train.fit import (
    FitResult,
    Stage,
    choose_strategy,
    encoder_groups,
    fit,
    from_scratch,
    plan_stages,
    set_trainable,
)
from medtl.train.lr_find import LRFindResult, find_lr, lr_sweep

__all__ = ["run_experiment", "prepare_data", "read_data", "PreparedData", "fit", "FitResult", "Stage", "plan_stages",
           "choose_strategy", "from_scratch", "set_trainable", "encoder_groups", "find_lr",
           "lr_sweep", "LRFindResult"]
