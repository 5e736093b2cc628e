"""The fixed sets of options: one list each, used by the configuration, the command line and the code.

Each set is a ``Literal`` type (what a type checker and :mod:`medtl.config` check a value against) and a
tuple of its values (what the command line offers as ``choices`` and error messages list).
"""

from __future__ import annotations

from typing import Literal, get_args

Modality = Literal["auto", "CT", "MR", "XR", "other"]  # data.modality
Intensity = Literal["auto", "ct_window", "file_window", "percentile", "dtype"]  # data.intensity
VolumeMode = Literal["middle", "mip", "2.5d", "slices", "slices_2.5d", "3d"]  # data.volume_mode
SliceAggregation = Literal["mean", "max", "topk"]  # data.slice_aggregation
ColourMode = Literal["auto", "rgb", "grey"]  # data.color
InputStore = Literal["float16", "float32"]  # data.input_store
Strategy = Literal[
    "auto", "linear_probe", "partial", "fine_tune", "gradual", "full", "logreg", "ncm", "bitfit", "lora", "lp_ft"
]  # train.strategy
Precision = Literal["auto", "bf16", "fp16", "fp32"]  # train.precision
OODMethod = Literal["knn", "mahalanobis", "off"]  # train.ood
SaliencyMethod = Literal["gradcam", "gradcampp", "occlusion", "integrated_gradients"]  # explain.method
AdaptMethod = Literal["adabn", "adabn_plain", "tent"]  # medtl adapt --method
ExportFormat = Literal["onnx", "torchscript"]  # medtl export --format
Backend = Literal["torch", "onnx", "torchscript"]  # the network a Predictor runs
DecisionSource = Literal["training", "evaluation"]  # which step chose a run's decision (both on validation data)
Tracking = Literal["tensorboard", "mlflow", "both", "off"]  # train.tracking: where a run's curves are recorded

MODALITIES: tuple[str, ...] = get_args(Modality)
INTENSITIES: tuple[str, ...] = get_args(Intensity)
VOLUME_MODES: tuple[str, ...] = get_args(VolumeMode)
SLICE_AGGREGATIONS: tuple[str, ...] = get_args(SliceAggregation)
COLOUR_MODES: tuple[str, ...] = get_args(ColourMode)
INPUT_STORES: tuple[str, ...] = get_args(InputStore)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PRECISIONS: tuple[str, ...] = get_args(Precision)
OOD_METHODS: tuple[str, ...] = get_args(OODMethod)
SALIENCY_METHODS: tuple[str, ...] = get_args(SaliencyMethod)
ADAPT_METHODS: tuple[str, ...] = get_args(AdaptMethod)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
BACKENDS: tuple[str, ...] = get_args(Backend)
DECISION_SOURCES: tuple[str, ...] = get_args(DecisionSource)
TRACKINGS: tuple[str, ...] = get_args(Tracking)
FEW_SHOT_HEADS = ("logreg", "ncm")  # strategies that fit a single-label head in closed form on cached features

__all__ = [
    "Modality",
    "Intensity",
    "VolumeMode",
    "SliceAggregation",
    "ColourMode",
    "InputStore",
    "Strategy",
    "Precision",
    "OODMethod",
    "SaliencyMethod",
    "AdaptMethod",
    "ExportFormat",
    "Backend",
    "DecisionSource",
    "Tracking",
    "MODALITIES",
    "INTENSITIES",
    "VOLUME_MODES",
    "SLICE_AGGREGATIONS",
    "COLOUR_MODES",
    "INPUT_STORES",
    "STRATEGIES",
    "PRECISIONS",
    "OOD_METHODS",
    "SALIENCY_METHODS",
    "ADAPT_METHODS",
    "EXPORT_FORMATS",
    "BACKENDS",
    "DECISION_SOURCES",
    "TRACKINGS",
    "FEW_SHOT_HEADS",
]
