"""The optional parts (pip extras): the error that names the one to install, pyproject.toml declaring every
library the code imports, and the core (training, prediction, the command line) working without the extras."""

from __future__ import annotations

import ast
import importlib.metadata
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from medtl.errors import MedtlError, MissingExtraError
from medtl.extras import EXTRAS, install_command, require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FOR_DEVELOPERS = {"test", "browser", "dev", "docs", "fuzz"}  # extras of the project's own tooling


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them: 'PyYAML' -> 'pyyaml', 'open_clip_torch' -> 'open-clip-torch'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised: 'PyYAML>=6,<7' -> 'pyyaml'."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return _normal(match[1])


def _extra_names(extra: str) -> set[str]:
    return {_name(r) for r in PROJECT["optional-dependencies"][extra] if not r.startswith("medtl[")}


def test_a_missing_module_names_its_extra_and_the_install_command():
    with pytest.raises(MissingExtraError) as info:
        require("ui", "medtl_no_such_module", "medtl serve")
    e = info.value
    assert e.extra == "ui"
    assert str(e).startswith("medtl serve needs the ui extra: pip install 'medtl[ui]'")
    assert "medtl_no_such_module" in str(e)
    assert isinstance(e, MedtlError) and isinstance(e, ImportError)  # one line from the CLI; still an ImportError
    again = pickle.loads(pickle.dumps(e))  # errors cross process boundaries (the bounded reader)
    assert (type(again), str(again), again.extra) == (MissingExtraError, str(e), "ui")


def test_a_module_missing_one_of_its_own_dependencies_names_the_extra_and_the_module(tmp_path, monkeypatch):
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import medtl_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"^half_installed needs the export extra: .*medtl_absent_dependency"):
        require("export", "half_installed")


def test_a_present_module_is_returned():
    import json

    assert require("tracking", "json") is json


def test_an_unknown_extra_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown extra 'gui'"):
        require("gui", "gradio")


def test_extras_match_pyproject():
    declared = set(PROJECT["optional-dependencies"]) - FOR_DEVELOPERS
    assert set(EXTRAS) == declared
    parts = [e for e in EXTRAS if e != "all"]
    assert PROJECT["optional-dependencies"]["all"] == [f"medtl[{','.join(parts)}]"]
    assert "medtl[all]" in PROJECT["optional-dependencies"]["test"]  # the suite covers every optional part
    assert install_command("pacs") == "pip install 'medtl[pacs]'"


def _imported_top_modules() -> dict[str, set[str]]:
    """Top-level module -> files of medtl/ and ui/ importing it (anywhere: function-level imports too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "medtl").rglob("*.py")) + sorted((ROOT / "ui").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_library_the_code_imports_is_declared():
    own = {"medtl", "medtl_ui", "__future__"}
    declared = {_name(r) for r in PROJECT["dependencies"]}
    for extra in set(PROJECT["optional-dependencies"]) - FOR_DEVELOPERS:
        declared |= _extra_names(extra)
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for module, files in sorted(_imported_top_modules().items()):
        if module in own or module in sys.stdlib_module_names:
            continue
        dists = {_normal(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared.append(f"{module} (from {', '.join(dists) or 'no installed distribution'}): {sorted(files)}")
    assert not undeclared, "imported but not in pyproject.toml:\n" + "\n".join(undeclared)


# as if they were not installed: an import fails with ModuleNotFoundError, importlib.util.find_spec gives None
BLOCK = "import sys\nsys.modules.update(dict.fromkeys(BLOCKED))\n"


def test_the_core_trains_predicts_and_names_the_extra_without_the_extras(tmp_path):
    """With every extra's own libraries absent, the training, prediction and evaluation code imports, and
    ``medtl serve`` fails at once with one line naming the ui extra (exit 2)."""
    core = {_name(r) for r in PROJECT["dependencies"]}
    optional = set().union(*(_extra_names(e) for e in EXTRAS if e != "all")) - core
    blocked = sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module.isidentifier() and {_normal(d) for d in dists} & optional
    )
    assert {"gradio", "onnxruntime", "dicomweb_client", "mlflow", "open_clip"} <= set(blocked)
    code = (
        f"BLOCKED = {set(blocked)!r}\n{BLOCK}"
        "import medtl.train, medtl.predict, medtl.eval, medtl.explain, medtl.export\n"
        "from medtl.cli import main\n"
        f"sys.exit(main(['serve', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "medtl serve needs the ui extra: pip install 'medtl[ui]'" in done.stderr
    assert "Traceback" not in done.stderr
