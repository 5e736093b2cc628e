"""Saving and loading fine-tuned models as safetensors, with their preprocessing record, and
reading a run folder back (:func:`load_saved_run`: its configuration and model)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medtl.errors import RunError
from medtl.models.encoders import Preprocessing, create_encoder
from medtl.models.peft import plain_state_dict

FORMAT_VERSION = "1"


def save_model(
    model: torch.nn.Module,
    path: str | Path,
    encoder: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    temperature: float | None = None,
    operating_point: dict | None = None,
    multi_label: bool = False,
) -> None:
    """Write weights and everything needed to rebuild and feed the model to one safetensors file.

    ``temperature`` (fitted on validation data) calibrates the probabilities; ``operating_point``
    (``{"threshold": t, "rule": ...}`` on the class-1 probability) is the decision rule for binary models
    (``{"thresholds": [t per finding], ...}`` for ``multi_label`` ones: a sigmoid per finding).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in plain_state_dict(model).items()}  # LoRA updates folded in
    meta = {
        "format": "medtl-classifier",
        "format_version": FORMAT_VERSION,
        "encoder": encoder,
        "class_names": json.dumps(class_names),
        "preprocessing": json.dumps(asdict(preprocessing)),
    }
    architecture = getattr(model, "pretrained_cfg", {}).get("medtl_architecture")
    if architecture is not None:  # rebuilt from this record, not from a hub (medtl.models.foundation)
        meta["architecture"] = json.dumps(architecture)
    if multi_label:
        meta["multi_label"] = "true"
    if temperature is not None:
        meta["temperature"] = json.dumps(float(temperature))
    if operating_point is not None:
        meta["operating_point"] = json.dumps(operating_point)
    save_file(state, str(path), metadata=meta)


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; returns (model in eval mode, metadata).

    The metadata holds ``encoder``, ``class_names``, ``preprocessing`` (a :class:`Preprocessing`),
    ``temperature``, ``operating_point`` and ``multi_label``.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is no mapping
    except Exception as e:
        raise RunError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if meta.get("format") != "medtl-classifier":
        raise RunError(f"{path}: not a medtl model (no medtl metadata)")
    pre = Preprocessing(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["preprocessing"]).items()}
    )
    class_names = json.loads(meta["class_names"])
    model = create_encoder(
        meta["encoder"],
        pretrained=False,
        num_classes=len(class_names),
        in_chans=pre.in_chans,
        input_size=pre.input_size,
        architecture=json.loads(meta["architecture"]) if "architecture" in meta else None,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunError(f"{path}: weights do not fit {meta['encoder']}: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    return model, {
        "encoder": meta["encoder"],
        "class_names": class_names,
        "preprocessing": pre,
        "temperature": json.loads(meta["temperature"]) if "temperature" in meta else None,
        "operating_point": json.loads(meta["operating_point"]) if "operating_point" in meta else None,
        "multi_label": meta.get("multi_label") == "true",
    }


__all__ = ["save_model", "load_model", "FORMAT_VERSION"]
