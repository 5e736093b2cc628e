"""Prediction: one path from a network's outputs to an answer, for a data set or for new files.

- :mod:`~medtl.predict.forward`: a network's logits and features (a PyTorch model or an exported one),
  with test-time augmentation written once;
- :mod:`~medtl.predict.post`: probabilities, slices aggregated into studies, and the :class:`Decision`,
  the one place a class is chosen;
- :mod:`~medtl.predict.refusal` and :mod:`~medtl.predict.ood`: when the model must not answer;
- :mod:`~medtl.predict.network`: exported networks (ONNX, TorchScript) run like PyTorch ones;
- :mod:`~medtl.predict.predictor`: :class:`Predictor`, a trained run loaded for new files;
- :mod:`~medtl.predict.batch`: many files to one resumable CSV.

The modules above ``predictor`` are imported on first use of their names, so training and evaluation,
which need only the prediction path, do not import the saliency code.
"""

import importlib

from medtl.predict.forward import (
    Network,
    batched_logits,
    batched_outputs,
    extract_features,
    forward_logits,
    module_network,
    network_outputs,
    predict_logits,
    predict_probs,
)
from medtl.predict.post import Decision, Judgement, Logits, aggregate_slices, aggregate_studies, to_probabilities

_LATER = {
    "Predictor": "predictor",
    "Prediction": "predictor",
    "Explanation": "predictor",
    "load_run": "predictor",
    "input_refusal": "refusal",
    "find_inputs": "batch",
    "predict_to_csv": "batch",
}

__all__ = [
    "Network",
    "module_network",
    "network_outputs",
    "forward_logits",
    "batched_outputs",
    "batched_logits",
    "predict_logits",
    "predict_probs",
    "extract_features",
    "Decision",
    "Judgement",
    "Logits",
    "aggregate_slices",
    "aggregate_studies",
    "to_probabilities",
    *_LATER,
]


def __getattr__(name: str):
    if name in _LATER:
        return getattr(importlib.import_module(f"medtl.predict.{_LATER[name]}"), name)
    raise AttributeError(f"module 'medtl.predict' has no attribute {name!r}")
