"""Training: one ``fit()`` loop, strategies as stages, objectives as objects, one recipe
(:func:`train_model`) that every trainer uses, run folders (:func:`run_experiment`) and a learning-rate
finder.

Read from the top: :mod:`~medtl.train.experiment` (a run folder from a config) uses
:mod:`~medtl.train.data` (decoding and splitting) and :mod:`~medtl.train.recipe` (the model and its
training), which calls :func:`~medtl.train.fitting.fit`: :mod:`~medtl.train.search` (``auto``, ensembles) or
one :class:`~medtl.train.trainer.Trainer` running the :mod:`~medtl.train.stages` of a strategy with the
:mod:`~medtl.train.objectives`, :mod:`~medtl.train.heads`, :mod:`~medtl.train.batching` and
:mod:`~medtl.train.loop` it needs."""

from medtl.models.groups import ALL
from medtl.train.data import PreparedData, create_datasets, prepare_data, read_data
from medtl.train.experiment import environment, resume_experiment, run_experiment
from medtl.train.fitting import fit
from medtl.train.loop import prefetch, use_prefetch
from medtl.train.lr_find import LRFindResult, find_lr, lr_sweep
from medtl.train.recipe import create_seeded_model, train_model
from medtl.train.search import auto_candidates
from medtl.train.stages import Stage, from_scratch, param_groups, plan_stages
from medtl.train.trainer import FitResult

__all__ = [
    "run_experiment",
    "resume_experiment",
    "train_model",
    "create_seeded_model",
    "create_datasets",
    "prepare_data",
    "read_data",
    "PreparedData",
    "environment",
    "fit",
    "FitResult",
    "Stage",
    "ALL",
    "plan_stages",
    "param_groups",
    "auto_candidates",
    "from_scratch",
    "prefetch",
    "use_prefetch",
    "find_lr",
    "lr_sweep",
    "LRFindResult",
]
