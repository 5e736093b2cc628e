"""Training: one ``fit()`` loop, strategies as stages, run folders, a learning-rate finder."""

from medtl.train.experiment import PreparedData, environment, prepare_data, prepare_run_dir, read_data, run_experiment
from medtl.train.fit import (
    ALL,
    FitResult,
    Stage,
    auto_candidates,
    fit,
    from_scratch,
    param_groups,
    plan_stages,
    prefetch,
    use_prefetch,
)
from medtl.train.lr_find import LRFindResult, find_lr, lr_sweep

__all__ = ["run_experiment", "prepare_data", "prepare_run_dir", "read_data", "PreparedData", "environment", "fit",
           "FitResult", "Stage", "ALL", "plan_stages", "param_groups", "auto_candidates", "from_scratch", "prefetch",
           "use_prefetch", "find_lr", "lr_sweep", "LRFindResult"]
