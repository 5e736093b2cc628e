"""The shape of the code at a git revision: lines per folder, the longest modules and functions, imports made
inside functions, import cycles and the number of layers of the import graph.

    python -m tools.structure            # the working tree
    python -m tools.structure 85e677d    # a commit

Layers: the parts of the package (``medtl.io``, ``medtl.predict``, ... and ``medtl_ui``) joined by every
import between them, module level or inside functions; parts on a cycle are merged into one; the number of
layers is the number of parts on the longest chain of imports.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from collections import defaultdict
from pathlib import Path

FOLDERS = ("medtl", "ui", "pipelines", "tools", "tests")


def _files(rev: str | None) -> dict[str, str]:
    """Path -> text of every Python file under FOLDERS, at ``rev`` (None: the working tree)."""
    if rev is None:
        return {str(p): p.read_text() for f in FOLDERS if Path(f).is_dir() for p in sorted(Path(f).rglob("*.py"))}
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, *FOLDERS], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        n: subprocess.run(["git", "show", f"{rev}:{n}"], capture_output=True, text=True, check=True).stdout
        for n in names
        if n.endswith(".py")
    }


def _module(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    if parts[0] == "ui":
        parts[0] = "medtl_ui"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """medtl.<first name> (a subpackage or top-level module), or medtl_ui."""
    bits = module.split(".")
    return "medtl_ui" if bits[0] == "medtl_ui" else ".".join(bits[:2])


def _imports(tree) -> tuple[list[str], int, int]:
    """(every absolute medtl import's module, how many import statements sit inside functions, how many of those
    import medtl itself)."""
    top = {id(n) for n in tree.body}
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for b in node.body
        for n in ast.walk(b)
    }
    out, inside, inside_medtl = [], 0, 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in typing_only:
            continue
        mods = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        ours = [m for m in mods if m.split(".")[0] in ("medtl", "medtl_ui", "ui")]
        out += ours
        if id(node) not in top and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            inside += 1
            inside_medtl += bool(ours)
    return out, inside, inside_medtl


def _layers(edges: dict[str, set[str]]) -> tuple[int, list[list[str]]]:
    """(layers of the part graph with cycles merged, the cycles)."""
    nodes = set(edges) | {t for ts in edges.values() for t in ts}
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in sorted(nodes):
        if v not in index:
            strong(v)
    comp_of = {v: i for i, comp in enumerate(sccs) for v in comp}
    dag = defaultdict(set)
    for v, ts in edges.items():
        for t in ts:
            if comp_of[v] != comp_of[t]:
                dag[comp_of[v]].add(comp_of[t])
    depth: dict[int, int] = {}

    def longest(c):
        if c not in depth:
            depth[c] = 1 + max((longest(d) for d in dag[c]), default=0)
        return depth[c]

    return max(longest(c) for c in range(len(sccs))), [sorted(c) for c in sccs if len(c) > 1]


def report(rev: str | None) -> dict:
    files = _files(rev)
    lines = defaultdict(int)
    modules, functions, inside, inside_medtl, edges = [], [], 0, 0, defaultdict(set)
    known = {_module(p) for p in files if p.startswith(("medtl/", "ui/"))}
    for path, text in files.items():
        n = len(text.splitlines())
        top = path.split("/")[0]
        folder = "/".join(path.split("/")[:2]) if top == "medtl" and path.count("/") > 1 else top
        lines[folder] += n
        modules.append((n, path))
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
        if not path.startswith(("medtl/", "ui/")):
            continue
        mods, k, km = _imports(tree)
        inside, inside_medtl = inside + k, inside_medtl + km
        own = _part(_module(path))
        for m in mods:
            m = m.replace("ui.", "medtl_ui.", 1) if m.startswith("ui.") else m
            while m not in known and "." in m:
                m = m.rsplit(".", 1)[0]
            if m in known and m != "medtl" and _module(path) != "medtl" and _part(m) != own:
                edges[own].add(_part(m))
    layers, cycles = _layers(edges)
    return {
        "lines": dict(sorted(lines.items())),
        "modules": len(modules),
        "modules_over_500": sorted((m for m in modules if m[0] > 500), reverse=True),
        "functions_over_60": sorted((f for f in functions if f[0] > 60), reverse=True),
        "imports_inside_functions": inside,
        "medtl_imports_inside_functions": inside_medtl,
        "parts": len(set(edges) | {t for v in edges.values() for t in v}),
        "layers": layers,
        "cycles": cycles,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="a git revision (default: the working tree)")
    r = report(parser.parse_args(argv).rev)
    for folder, n in r["lines"].items():
        print(f"{folder:28s} {n:6d} lines")
    print(f"{'all':28s} {sum(r['lines'].values()):6d} lines in {r['modules']} modules")
    print("modules over 500 lines:", ", ".join(f"{p} ({n})" for n, p in r["modules_over_500"]) or "none")
    print("functions over 60 lines:", ", ".join(f"{p} ({n})" for n, p in r["functions_over_60"]) or "none")
    print(
        f"imports inside functions in medtl/ and ui/: {r['imports_inside_functions']} "
        f"({r['medtl_imports_inside_functions']} of them of medtl itself)"
    )
    print(f"import graph: {r['parts']} parts, {r['layers']} layers, cycles: {r['cycles'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
