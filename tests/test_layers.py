"""The package's structure: layers point down (every import counted, in functions too), no cycles, no
private names cross modules, no module or function too long to read, start-up stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each part may import only the parts on lower levels (or its own). Read from the bottom: a part's level is
# above everything it needs.
LEVELS = {
    "medtl.version": 0,
    "medtl.errors": 0,
    "medtl.options": 0,  # names and words, no dependencies
    "medtl.progress": 0,  # phases of a long job, logged with an estimate of the time left
    "medtl.config": 1,
    "medtl.runtime": 1,
    "medtl.threads": 1,  # compute threads fitted to the free cores
    "medtl.metrics": 1,  # settings, the machine, pure metrics
    "medtl.extras": 1,  # the optional parts (pip extras) and the error naming the one to install
    "medtl.io": 2,  # reading scans
    "medtl.models": 3,  # encoders, their weights and preprocessing records
    "medtl.run": 4,  # the run folder
    "medtl.transforms": 5,  # scans into model inputs
    "medtl.data": 6,  # data sets, splits
    "medtl.explain": 7,  # saliency maps
    "medtl.predict": 8,  # the prediction path, the decision, Predictor
    "medtl.adapt": 9,  # adapting a run to a new site
    "medtl.train": 10,  # the training loop and recipe
    "medtl.eval": 11,
    "medtl.export": 11,  # judging a run; packaging it
    "medtl.clinical": 12,  # de-identification, DICOM results, PACS
    "medtl_ui": 13,  # the web page
    "medtl.cli": 14,  # the command line (``medtl serve`` starts the web page)
}
LIMITS = {"module_lines": 500, "function_lines": 60}
# (module, function) -> why it may be longer than LIMITS["function_lines"]
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}


def _part(module: str) -> str | None:
    """The LEVELS key a dotted module belongs to (the longest matching prefix)."""
    keys = [k for k in LEVELS if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def _sources():
    for path in sorted((ROOT / "medtl").rglob("*.py")) + sorted((ROOT / "ui").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "ui":
            parts[0] = "medtl_ui"
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        yield ".".join(parts), path, package


def _modules():
    for module, path, _ in _sources():
        yield module, ast.parse(path.read_text())


def _type_checking_only(tree) -> set[int]:
    """The ids of import nodes inside ``if TYPE_CHECKING:`` blocks (for type checkers only; never run)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for b in node.body for n in ast.walk(b)}
    return ids


def _imports(tree, top_level_only: bool = False):
    """(module, names, at module level) of every absolute import."""
    skip = _type_checking_only(tree)
    top = {id(n) for n in tree.body}
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in top


def _targets(imported: str, names: list[str], known: set[str]) -> list[str]:
    """The modules an import reaches: ``from pkg import sub`` reaches ``pkg.sub`` where that is a module."""
    subs = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in known]
    return subs + ([imported] if len(subs) < len(names) or not names else [])


def _graph() -> dict[str, set[str]]:
    """Module -> the medtl modules it imports (anywhere in it); the top package ``medtl`` (lazy names only)
    is left out."""
    known = {m for m, _, _ in _sources()}
    graph = {}
    for module, tree in _modules():
        if module == "medtl":
            continue
        edges = set()
        for imported, names, _ in _imports(tree):
            for target in _targets(imported, names, known):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target not in (module, "medtl"):
                    edges.add(target)
        graph[module] = edges
    return graph


def test_layers_point_down_counting_imports_inside_functions():
    wrong = []
    for module, edges in _graph().items():
        own = _part(module)
        assert own is not None, f"{module} has no level in LEVELS: give it one"
        for target in edges:
            other = _part(target)
            if other and other != own and LEVELS[other] >= LEVELS[own]:
                wrong.append(
                    f"{module} imports {target} ({other}, level {LEVELS[other]}, is not below {own}, "
                    f"level {LEVELS[own]})"
                )
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_another_modules_private_names():
    wrong = [
        f"{module}: from {imported} import {name}"
        for module, tree in _modules()
        for imported, names, _ in _imports(tree)
        if imported.startswith(("medtl", "ui")) and imported != module
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_or_function_too_long():
    wrong = []
    for module, path, _ in _sources():
        text = path.read_text()
        if len(text.splitlines()) > LIMITS["module_lines"]:
            wrong.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LIMITS["function_lines"] and (module, node.name) not in LONG_FUNCTIONS:
                    wrong.append(f"{module}.{node.name}: {n} lines")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_start_up_imports_no_torch_monai_or_timm(args):
    code = (
        f"import sys; from medtl.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'monai', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_info_imports_only_the_readers(tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    code = (
        f"import sys; from medtl.cli import main; main(['-q', 'info', {str(tmp_path / 'x.png')!r}]); "
        "print(sorted(m for m in ('torch', 'monai', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert '"usable": true' in out and out.strip().splitlines()[-1] == "[]"


def test_every_subpackage_is_installed():
    """pyproject.toml lists packages by hand (ui/ installs as medtl_ui): a new subpackage must be in it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medtl").rglob("__init__.py")}
    assert found | {"medtl_ui"} <= listed
