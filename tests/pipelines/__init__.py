"""The research pipelines (pipelines/*.py) run end to end on tiny data."""

import importlib.util
from pathlib import Path
from types import ModuleType

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def load_pipeline(name: str) -> ModuleType:
    """A pipeline script imported as a module (pipelines/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, PIPELINES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
