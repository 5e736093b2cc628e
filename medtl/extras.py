"""The optional parts of medtl (pip extras) and the import that names the one to install.

The core (``pip install medtl``) trains, evaluates, explains and predicts. Each extra adds one feature and
the libraries it needs; a command that needs one imports them with :func:`require`, which fails with
:class:`~medtl.errors.MissingExtraError` saying what to install instead of a bare ``ModuleNotFoundError``::

    gr = require("ui", "gradio", "medtl serve")
    # MissingExtraError: medtl serve needs the ui extra: pip install 'medtl[ui]' (No module named 'gradio')

pyproject.toml's ``[project.optional-dependencies]`` lists the packages of each; the test suite checks that
the two agree.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medtl.errors import MissingExtraError

# extra -> what it adds (the modules are imported through require() where they are used)
EXTRAS = {
    "ui": "the web UI (medtl serve): gradio",
    "pacs": "PACS, DICOM and FHIR results (medtl pacs, medtl dicom-results): dicomweb-client, pynetdicom, "
    "highdicom, fhir.resources",
    "export": "ONNX export and ONNX Runtime prediction (medtl export --format onnx): onnx, onnxscript, onnxruntime",
    "foundation": "medical foundation encoders: open_clip (BiomedCLIP), transformers (RAD-DINO), torchxrayvision",
    "tracking": "runs logged to MLflow: mlflow",
    "all": "every extra above",
}


def install_command(extra: str) -> str:
    """The pip command that installs ``extra`` (quoted for a shell)."""
    return f"pip install 'medtl[{extra}]'"


def require(extra: str, module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` (part of ``extra``) and return it; if it cannot be imported, raise
    :class:`~medtl.errors.MissingExtraError` naming the extra and its install command. ``feature`` says
    what needs it in the message (a command such as ``"medtl serve"``; default: the module)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r} (one of {', '.join(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ImportError as e:  # not installed, or installed without one of its own dependencies
        raise MissingExtraError(
            f"{feature or module} needs the {extra} extra: {install_command(extra)} ({e})", extra
        ) from e


__all__ = ["EXTRAS", "install_command", "require"]
