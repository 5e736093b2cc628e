"""Adapting a trained model to a new site without its labels: BatchNorm statistics matched to the new
images (AdaBN), test-time entropy minimisation (TENT) (:mod:`~medtl.adapt.batchnorm`), and ``medtl adapt``,
which writes the adapted run (:mod:`~medtl.adapt.site`)."""

from medtl.adapt.batchnorm import (
    BN_FILE,
    METHODS,
    adabn,
    adapt,
    batchnorms,
    bn_statistics,
    information_loss,
    load_bn_statistics,
    save_bn_statistics,
    tent,
)

__all__ = [
    "adabn",
    "tent",
    "adapt",
    "bn_statistics",
    "batchnorms",
    "information_loss",
    "save_bn_statistics",
    "load_bn_statistics",
    "METHODS",
    "BN_FILE",
]
