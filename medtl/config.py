"""Experiment configuration: one frozen dataclass per part, one YAML file per experiment.

Every field carries a comment saying what it does. Unknown keys are rejected with a
"did you mean" hint, and the resolved configuration is saved next to every run's outputs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtl.errors import ConfigError, did_you_mean, did_you_mean_device, look_up_option
from medtl.options import (
    STRATEGIES,
    ColourMode,
    InputStore,
    Intensity,
    Modality,
    OODMethod,
    Precision,
    SaliencyMethod,
    SliceAggregation,
    Strategy,
    Tracking,
    VolumeMode,
)

SCHEMA_VERSION = 2  # the layout of an experiment's configuration (and of the run folder that saves it);
#   files without ``schema_version`` are version 1, whose experiment files read unchanged (medtl.run migrates
#   version-1 run folders)

# Named CT windows in Hounsfield units: (level, width). Standard radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
}


@dataclass(frozen=True)
class DataConfig:
    """Which images are read and how their intensities are prepared."""

    path: str | None = None  # manifest CSV, image folder (one sub-folder per class) or MedMNIST .npz
    modality: Modality = "auto"  # "auto" (from the file), "CT", "MR", "XR" or "other": overrides the file's modality
    intensity: Intensity = "auto"  # "auto" (by modality), "ct_window", "file_window", "percentile" or "dtype"
    #   (value / type max)
    ct_window: str = "soft_tissue"  # CT window name (see CT_WINDOWS), or "multi" to stack ct_multi_windows as channels
    ct_multi_windows: tuple[str, ...] = ("lung", "mediastinum", "bone")  # the 3 windows of ct_window "multi"
    percentiles: tuple[float, float] = (0.5, 99.5)  # "percentile" scaling: values at these percentiles map to 0 and 1
    volume_mode: VolumeMode = "middle"  # 3D into 2D: "middle", "mip", "2.5d" (3 adjacent slices), "slices",
    #   "slices_2.5d"; or "3d": the whole volume into a 3D encoder (resnet18_3d, ...)
    slice_aggregation: SliceAggregation = "mean"  # "slices" modes: study score from slice scores by "mean", "max"
    #   or "topk"
    top_k: int = 3  # slices averaged by slice_aggregation "topk"
    volume_index: int | None = None  # which volume of a 4D NIfTI (None: 4D files are refused)
    val_fraction: float = 0.2  # share of patients held out for validation (ignored when the data has its own split)
    test_fraction: float = 0.2  # share of patients held out for the final test (ditto)
    augment: bool = True  # light MONAI augmentation (small rotation/zoom, flip, intensity, noise) in training
    flip: bool = True  # left-right flips in augmentation (turn off where laterality matters)
    cache_dir: str | None = None  # MONAI PersistentDataset folder for decoded inputs (None: kept in memory only)
    input_store: InputStore = "float16"  # how prepared model inputs are kept for training and evaluation: "float16"
    #   (half the memory; finer than bf16 compute) or "float32"; memory-mapped (in cache_dir) above 2 GiB
    color: ColourMode = "auto"  # "auto": colour sources (fundus, dermoscopy, pathology...) in RGB, grey ones
    #   repeated to 3 channels; "rgb": the same, but grey sources are refused; "grey": everything as luminance
    color_jitter: float = 0.0  # colour augmentation strength (brightness, contrast, saturation, hue; 0 = off, ~0.1)
    classes: tuple[str, ...] | dict[str, str] | None = None  # the labels accepted, in class order (None: the
    #   data's own, checked to share one form: all indices 0, 1, ... or all names); rows with other labels are
    #   reported and skipped. A mapping {label: class name} also names the classes ({0: no lesion, 1: lesion})
    allow_outside_paths: bool = False  # let a manifest name images by absolute path or outside its folder (../)
    unlabelled: str | None = None  # images without labels for semi-supervised training (FixMatch consistency, in the
    #   stages that train the encoder): an image folder, a manifest (its labels unused) or a MedMNIST .npz (its
    #   training images); images that are also in the validation or test split are left out
    label_columns: tuple[str, ...] | None = None  # multi-label manifest with one 0/1 column per finding: those
    #   columns (a manifest with a "findings" column of names separated by "|" needs no setting)
    positive_class: str | None = None  # two classes: the finding, the class a positive answer means (the decision
    #   threshold is on its probability; sensitivity is stated for it). None: the source's own (MedMNIST: its
    #   clinical finding, BreastMNIST "malignant"), else the second class


@dataclass(frozen=True)
class EncoderConfig:
    """Which pretrained encoder is used and at what input size."""

    name: str = "efficientnet_lite0"  # a registered encoder (medtl encoders) or an open name SOURCE:REF:
    #   timm:NAME, hf-hub:REPO, local-dir:PATH, tv:NAME, xrv:WEIGHTS, open_clip:..., transformers:REPO
    pretrained: bool = True  # load ImageNet weights (offline for the EfficientNet-Lite family)
    weights_file: str | None = None  # local weight file for encoders without offline weights
    input_size: int | None = None  # square input side in pixels; None = the weights' own (224)
    drop_rate: float = 0.2  # dropout before the classification head


@dataclass(frozen=True)
class TrainConfig:
    """How the encoder is fine-tuned."""

    strategy: Strategy = "fine_tune"  # one of medtl.options.STRATEGIES; "auto" trains each of auto_candidates and
    #   keeps the best on validation (their scores are saved with the run);
    #   "logreg" / "ncm": few-shot heads fitted in closed form on the frozen encoder's features; "bitfit" / "lora":
    #   parameter-efficient (biases and norms / low-rank updates of the encoder); "lp_ft": converged linear probe,
    #   then fine-tuning (medtl.train.stages.plan_stages)
    frozen_epochs: int = 6  # epochs training the head alone before unfreezing (partial, fine_tune, gradual)
    epochs: int = 16  # epochs with encoder layers trainable (or of the head, for linear_probe)
    unfreeze_groups: int = 2  # "partial": encoder layer groups (stages) trained, counted from the top
    gradual_epochs: int = 1  # "gradual": epochs before the next lower layer group is unfrozen
    lora_rank: int = 8  # "lora": rank of the low-rank update of each encoder layer
    unlabelled_weight: float = 1.0  # semi-supervised (data.unlabelled): weight of the consistency loss (FixMatch)
    pseudo_threshold: float = 0.95  # semi-supervised: confidence an answer on an unlabelled image needs to be a target
    ensemble: int = 1  # > 1: that many trainings (seeds seed, seed+1, ...) averaged into one network by a greedy
    #   weight-space soup chosen on validation (training costs n times as much; prediction costs one model)
    auto_candidates: tuple[str, ...] = ("logreg", "partial", "fine_tune")  # the strategies "auto" tries, cheapest
    #   first (a tie goes to the earlier); single-label heads (logreg, ncm) are skipped for multi-label data
    batch_size: int | str = 8  # images per optimisation step (global, over all processes under torchrun); "auto":
    #   8 on a CPU, on a GPU the largest that fits (up to 256), lr scaled by sqrt(batch / 8) (medtl.train.batching)
    workers: int | str = "auto"  # processes reading files and preparing inputs; "auto": files read by one per core
    #   (up to 8) for 200 files or more; inputs prepared in the main process on a CPU, by spare cores on a GPU
    lr: float = 3e-3  # peak learning rate of the head (for batches of 8; "auto" batches scale it)
    encoder_lr_mult: float = 0.05  # top encoder layer group's learning rate = lr * this
    layer_decay: float = 0.8  # each lower layer group's rate = the one above's * this (1.0: one rate)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_epochs: float = 0.5  # linear warm-up length at the start of every stage, in epochs
    label_smoothing: float = 0.05  # cross-entropy label smoothing
    freeze_bn: bool = True  # keep encoder BatchNorm statistics at their ImageNet values (small batches)
    class_weighting: bool = True  # weight the loss by inverse class frequency
    mixup: float = 0.0  # mixup Beta(alpha, alpha) on inputs and targets; 0 turns it off
    tta: bool = False  # evaluation and prediction average the image and its left-right flip
    ood: OODMethod = "knn"  # refusal of inputs unlike the training images, by their encoder features: "knn",
    #   "mahalanobis" or "off" (medtl.predict.ood)
    ood_quantile: float = 0.99  # refusal threshold: this quantile of the validation studies' scores
    cache_features: bool = True  # head-only stages train on encoder features extracted once (no augmentation)
    patience: int = 6  # stop a stage after this many epochs without a better validation score
    precision: Precision = "auto"  # "auto" (bf16 where the CPU/GPU runs it natively), "bf16", "fp16" (CUDA AMP)
    #   or "fp32"
    channels_last: bool = True  # NHWC memory layout (about 2x faster convolutions on CPU)
    compile: bool = False  # torch.compile the model for stages that train the encoder
    seed: int = 0  # seed of every random generator (weights, sampling, augmentation, dropout)
    deterministic: bool = False  # torch deterministic algorithms (slower; bit-identical reruns on GPU too)
    device: str = "auto"  # "auto" (a GPU where one can be reached), "cpu", "cuda" or "cuda:N"
    tracking: Tracking = "tensorboard"  # where the curves go: "tensorboard" (RUN/tensorboard), "mlflow", "both" or
    #   "off" (RUN/train.log and history.csv are always written)
    tracking_uri: str | None = None  # MLflow tracking URI; None: a local store in the run (sqlite:///RUN/mlflow.db)


@dataclass(frozen=True)
class ExplainConfig:
    """How saliency maps are made and drawn."""

    method: SaliencyMethod = "gradcam"  # default saliency method: gradcam, gradcampp, occlusion or integrated_gradients
    n_overlays: int = 6  # test images written as overlays after training
    alpha: float = 0.45  # overlay opacity


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, encoder, training and explanation settings."""

    schema_version: int = SCHEMA_VERSION  # the configuration's layout (see SCHEMA_VERSION); older files are read as
    #   their version says, a newer one is refused
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(to_dict(self), sort_keys=False))


def to_plain(obj: Any) -> Any:
    """Plain YAML/JSON-ready values: tuples to lists, numpy scalars and str subclasses to builtins."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:  # a numpy scalar (numpy not imported)
        return obj.item()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-ready dict of a config dataclass (tuples become lists)."""
    return to_plain(dataclasses.asdict(cfg))


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _expected(hint: Any) -> str:
    """A type hint in words: "a number", "an integer", "true or false", "a list of 2 numbers"..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "a string"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None)) + " (or null)"
    if origin is dict:
        return "a mapping {label: class name}"
    if origin is tuple:
        item = "strings" if args[0] is str else "numbers"
        return f"a list of {item}" if args[-1] is Ellipsis else f"a list of {len(args)} {item}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_type(value: Any, hint: Any) -> Any:
    """``value`` as the type of ``hint``, or raise ``TypeError``. Numbers written as ``1e-4`` (strings to
    YAML 1.1) are numbers; an integer field refuses 2.5 and a number field refuses "abc"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:  # a string here; one of the options is checked by validate_config (did you mean)
        if isinstance(value, str):
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _check_type(value, a)
                except TypeError:
                    pass
        raise TypeError
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise TypeError
        return {str(_check_type(k, (str, int))): _check_type(v, args[1]) for k, v in value.items()}
    if isinstance(hint, tuple):  # any of these plain types
        if isinstance(value, hint) and not isinstance(value, bool):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise TypeError
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return tuple(_check_type(v, a) for v, a in zip(value, items))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise TypeError from None
            if math.isfinite(number):
                return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise TypeError


def config_from_dict(cls: type, values: dict[str, Any], where: str = "", source: str | Path | None = None) -> Any:
    """A config dataclass from a (nested) dict: unknown keys refused with a "did you mean" hint,
    every value checked against its field's annotation. ``source`` (the YAML file) is named in errors."""
    if not isinstance(values, dict):
        raise ConfigError(source, f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(
                source,
                f"unknown config key {name!r}{did_you_mean(key, fields)}",
                expected="one of " + ", ".join(fields),
            )
        f = fields[key]
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            kwargs[key] = config_from_dict(factory, value or {}, name, source)
            continue
        try:
            kwargs[key] = _check_type(value, hints[key])
        except TypeError:
            raise ConfigError(
                source, f"{name}: {value!r} is not {_expected(hints[key])}", _expected(hints[key])
            ) from None
    return cls(**kwargs)


MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few kilobytes; a larger file is refused unread


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with few aliases allowed: nested aliases ("billion laughs") make a value whose every
    printing takes seconds and hundreds of megabytes."""

    MAX_ALIASES = 16

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.MAX_ALIASES:
                raise yaml.YAMLError(f"more than {self.MAX_ALIASES} aliases (*name): not a configuration")
        return super().compose_node(parent, index)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: ``{}``), or a :class:`ConfigError` naming the file and
    what is wrong, in a few hundred characters at most: missing, over :data:`MAX_CONFIG_BYTES`, not UTF-8, not
    YAML, nested too deeply, or a list, number or string at the top."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "config file not found")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(p, f"{p.stat().st_size} bytes: not a configuration", f"at most {MAX_CONFIG_BYTES} bytes")
    try:
        values = yaml.load(p.read_bytes().decode("utf-8"), Loader=_ConfigLoader)  # (a SafeLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(p, f"not UTF-8 text (byte {e.start})", "a YAML file in UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(p, f"not valid YAML: {str(e)[:300]}") from None
    except RecursionError:
        raise ConfigError(p, "nested too deeply to be a configuration") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of thousands of digits
        raise ConfigError(p, f"a value cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(p, f"a YAML {type(values).__name__} at the top, not a configuration", "a mapping: data:, ...")
    return values


def load_config(path: str | Path | None = None, **overrides: dict[str, Any]) -> ExperimentConfig:
    """Read an experiment YAML (or the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    cfg = config_from_dict(ExperimentConfig, _merge(values, overrides), "", path)
    validate_config(cfg, path)
    return cfg


# (section.field, lowest, highest, lowest allowed itself): numeric limits checked by validate_config
LIMITS = [
    ("data.top_k", 1, None, True),
    ("data.volume_index", 0, None, True),
    ("data.color_jitter", 0.0, 0.5, True),
    ("encoder.input_size", 16, 4096, True),
    ("encoder.drop_rate", 0.0, 1.0, True),
    ("train.frozen_epochs", 0, None, True),
    ("train.epochs", 0, None, True),
    ("train.unfreeze_groups", 1, None, True),
    ("train.gradual_epochs", 1, None, True),
    ("train.lora_rank", 1, 512, True),
    ("train.ensemble", 1, 64, True),
    ("train.unlabelled_weight", 0.0, None, True),
    ("train.pseudo_threshold", 0.5, 1.0, False),
    ("train.batch_size", 1, None, True),
    ("train.workers", 0, 64, True),
    ("train.lr", 0.0, 10.0, False),
    ("train.encoder_lr_mult", 0.0, None, True),
    ("train.layer_decay", 0.0, 1.0, False),
    ("train.weight_decay", 0.0, None, True),
    ("train.warmup_epochs", 0.0, None, True),
    ("train.label_smoothing", 0.0, 1.0, True),
    ("train.ood_quantile", 0.5, 0.9999, True),
    ("train.mixup", 0.0, None, True),
    ("train.patience", 1, None, True),
    ("explain.n_overlays", 0, None, True),
    ("explain.alpha", 0.0, 1.0, True),
]


def _check_limits(cfg: ExperimentConfig, source) -> None:
    for name, lo, hi, lo_inclusive in LIMITS:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None or value == "auto":
            continue
        low_ok = value >= lo if lo_inclusive else value > lo
        if not low_ok or (hi is not None and value > hi):
            bound = f"{'>=' if lo_inclusive else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(source, f"{name}: {value!r} is out of range", f"a value {bound}")
    lo, hi = cfg.data.percentiles
    if not 0 <= lo < hi <= 100:
        raise ConfigError(
            source,
            f"data.percentiles: {list(cfg.data.percentiles)} is out of range",
            "two percentiles 0 <= low < high <= 100",
        )


def validate_config(cfg: ExperimentConfig, source: str | Path | None = None) -> None:
    """Reject values that would fail later, with the valid options (``source``: the YAML file, named
    in the error)."""
    try:
        _validate(cfg)
        _check_limits(cfg, source)
    except ConfigError as e:
        if source is None or e.path is not None:
            raise
        raise ConfigError(source, e.problem, e.expected) from None


def _check_options(cfg: ExperimentConfig) -> None:
    """Every field whose type is a fixed set of options (:mod:`medtl.options`) holds one of them."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        hints = typing.get_type_hints(type(part))
        for f in dataclasses.fields(part):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                look_up_option(getattr(part, f.name), typing.get_args(hints[f.name]), f"{section.name}.{f.name}")


def _validate(cfg: ExperimentConfig) -> None:
    if not 1 <= cfg.schema_version <= SCHEMA_VERSION:
        raise ConfigError(
            None,
            f"schema_version {cfg.schema_version} is not one this medtl reads (a newer medtl wrote it?)",
            f"1 to {SCHEMA_VERSION}",
        )
    _check_options(cfg)
    look_up_option(cfg.data.ct_window, [*CT_WINDOWS, "multi"], "CT window")
    if cfg.data.color_jitter > 0 and (
        cfg.data.color == "grey" or cfg.data.ct_window == "multi" or cfg.data.volume_mode in ("2.5d", "slices_2.5d")
    ):
        raise ConfigError(
            None,
            "data.color_jitter needs colour inputs: its hue and saturation would mix CT windows or neighbouring slices",
            "color 'auto' or 'rgb', one CT window, a non-2.5d mode",
        )
    if cfg.data.ct_window == "multi":
        if len(cfg.data.ct_multi_windows) != 3:
            raise ConfigError(None, f"data.ct_multi_windows needs 3 windows, got {len(cfg.data.ct_multi_windows)}")
        for w in cfg.data.ct_multi_windows:
            look_up_option(w, CT_WINDOWS, "CT window")
        if cfg.data.volume_mode.endswith("2.5d"):
            raise ConfigError(
                None, "ct_window 'multi' and a 2.5d volume mode both fill the 3 input channels", "one of the two"
            )
    for name in cfg.train.auto_candidates:
        look_up_option(name, [s for s in STRATEGIES if s != "auto"], "strategy (train.auto_candidates)")
    for name in ("batch_size", "workers"):
        value = getattr(cfg.train, name)
        if isinstance(value, str) and value != "auto":
            raise ConfigError(None, f"train.{name}: {value!r} is not an integer or 'auto'", "an integer or 'auto'")
    device = cfg.train.device
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(
            None,
            f"unknown device {device!r}{did_you_mean_device(device)}",
            "'auto', 'cpu', 'cuda' or 'cuda:N' (N: the GPU's index)",
        )
    for name, v in [("data.val_fraction", cfg.data.val_fraction), ("data.test_fraction", cfg.data.test_fraction)]:
        if not 0.0 < v < 0.5:
            raise ConfigError(None, f"{name} must be between 0 and 0.5, got {v}")
