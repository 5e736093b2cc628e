"""The package's structure: layers point down, no private names cross modules, start-up stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each part may import (at module level) only the parts on lower levels (or its own).
LEVELS = {
    "medtl.errors": 0, "medtl.config": 1, "medtl.runtime": 1, "medtl.eval.metrics": 1, "medtl.ood": 1, "medtl.io": 2, "medtl.deid": 2,
    "medtl.models": 3, "medtl.transforms": 4, "medtl.checkpoint": 4, "medtl.data": 5, "medtl.predict": 6,
    "medtl.explain": 7, "medtl.adapt": 7.5, "medtl.train": 8, "medtl.eval": 9, "medtl.export": 9, "medtl.inference": 10, "medtl.batch": 10.5, "medtl.dicom_results": 10.5, "medtl.pacs": 10.7, "medtl.site": 10.6, "medtl.cli": 11, "medtl_ui": 12,
}


def _part(module: str) -> str | None:
    """The LEVELS key a dotted module belongs to (the longest matching prefix)."""
    keys = [k for k in LEVELS if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def _modules():
    for path in sorted((ROOT / "medtl").rglob("*.py")) + sorted((ROOT / "ui").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "ui":
            parts[0] = "medtl_ui"
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), ast.parse(path.read_text())


def _imports(tree, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_layers_point_down():
    wrong = []
    for module, tree in _modules():
        own = _part(module)
        if own is None or module == "medtl":
            continue
        for imported, names in _imports(tree, top_level_only=True):
            targets = [f"{imported}.{n}" for n in names if _part(f"{imported}.{n}")] or [imported]
            for target in targets:
                other = _part(target)
                if other and other != own and not own.startswith(other + ".") and LEVELS[other] >= LEVELS[own]:
                    wrong.append(f"{module} imports {target} ({other} is not below {own})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{module}: from {imported} import {name}" for module, tree in _modules()
             for imported, names in _imports(tree, top_level_only=False)
             if imported.startswith(("medtl", "ui")) and imported != module
             for name in names if name.startswith("_") and name != "__version__"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_start_up_imports_no_torch_monai_or_timm(args):
    code = ("import sys; from medtl.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'monai', 'timm') if m in sys.modules))" % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_info_imports_only_the_readers(tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    code = ("import sys; from medtl.cli import main; main(['-q', 'info', %r]); "
            "print(sorted(m for m in ('torch', 'monai', 'timm') if m in sys.modules))" % str(tmp_path / "x.png"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert '"usable": true' in out and out.strip().splitlines()[-1] == "[]"


def test_every_subpackage_is_installed():
    """pyproject.toml lists packages by hand (ui/ installs as medtl_ui): a new subpackage must be in it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medtl").rglob("__init__.py")}
    assert found | {"medtl_ui"} <= listed
