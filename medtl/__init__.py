"""medtl: transfer learning for medical images.

ImageNet-pretrained encoders (timm) fine-tuned on small clinical label sets, with MONAI
preprocessing, patient-level evaluation, Grad-CAM explanations and a Gradio UI.
Importing medtl does nothing else: no downloads, no seeding, no warning filters. The public
names below are imported on first use (PEP 562), so ``import medtl`` and ``medtl --version``
load no torch, MONAI or timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medtl.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "ExperimentConfig": "medtl.config",
    "load_config": "medtl.config",
    "MedtlError": "medtl.errors",
    "MedtlInputError": "medtl.errors",
    "Predictor": "medtl.predict.predictor",
    "load_run": "medtl.predict.predictor",
    "Scan": "medtl.io",
    "read_image": "medtl.io",
    "create_encoder": "medtl.models",
    "list_encoders": "medtl.models",
    "run_experiment": "medtl.train",
    "Runtime": "medtl.runtime",
    "RunDir": "medtl.run",
    "Decision": "medtl.predict.post",
    "train_model": "medtl.train",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medtl' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs only
    from medtl.config import ExperimentConfig, load_config
    from medtl.errors import MedtlError, MedtlInputError
    from medtl.io import Scan, read_image
    from medtl.models import create_encoder, list_encoders
    from medtl.predict.post import Decision
    from medtl.predict.predictor import Predictor, load_run
    from medtl.run import RunDir
    from medtl.runtime import Runtime
    from medtl.train import run_experiment, train_model
