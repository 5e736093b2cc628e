"""A griffe extension for the API reference (mkdocs.yml loads it; nothing in medtl imports it).

medtl's docstrings are written for reading in the source: reST roles (:func:`name`,
:class:`~medtl.run.RunDir`), one reST simple table, and fields documented by the comment on their
line (``lr: float = 3e-3  # peak learning rate ...``, continued on ``#   ...`` lines). Markdown shows
none of these, so once the package is loaded (statically: nothing is imported):

- each role becomes a code span that links to the object where the reference renders it (an optional
  autoref: an object the reference does not show stays plain code, with no warning);
- a reST simple table becomes a Markdown table;
- an attribute without a docstring takes its trailing comment as one.

The source files are not changed.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<target>[^`<>]+?)`(?:\\ )?")
BORDER = re.compile(r"^(=+)( +=+)+\s*$")
CONTINUATION = re.compile(r"^\s*#   (?P<text>.*)$")  # a comment line continuing the comment above


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full path a role's target names, resolved in the scope of the object whose docstring holds it."""
    if target.startswith("medtl."):
        return target
    head, _, rest = target.partition(".")
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, griffe.AliasResolutionError, KeyError):
        return target
    return f"{path}.{rest}" if rest else path


def _role(obj: griffe.Object, match: re.Match) -> str:
    target = match["target"].strip().rstrip("()")
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target
    return f'<autoref identifier="{_identifier(obj, target)}" optional><code>{title}</code></autoref>'


def _tables(text: str) -> str:
    """reST simple tables (a border, rows, a border) as Markdown tables with an empty header."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        end = next((j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])), None)
        if not BORDER.match(lines[i]) or end is None:
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        rows: list[list[str]] = []
        for line in lines[i + 1:end]:
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
            if rows and not cells[0]:  # a continuation line of the row above
                rows[-1] = [f"{r} {c}".strip() for r, c in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        out += ["|" + " |" * len(starts), "|" + "---|" * len(starts)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        i = end + 1
    return "\n".join(out)


def _comments(path: Path) -> tuple[dict[int, str], list[str]]:
    """(line number -> the comment that ends that line of code, the file's lines)."""
    text = path.read_text()
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:].strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    return {n: c for n, c in comments.items() if n in code_lines}, text.split("\n")


class ReSTRoles(griffe.Extension):
    """Rewrites the docstrings of the loaded package once it is fully loaded (so every name resolves)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._files: dict[Path, tuple[dict[int, str], list[str]]] = {}
        self._walk(pkg, pkg, seen=set())

    def _walk(self, obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is None and obj.is_attribute:
            self._from_comment(obj, pkg)
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: _role(obj, m), _tables(obj.docstring.value))
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, pkg, seen)

    def _from_comment(self, attr: griffe.Object, pkg: griffe.Module) -> None:
        """The trailing comment of an attribute's last line (and the ``#   `` lines under it) as its docstring."""
        path = attr.filepath
        if not isinstance(path, Path) or attr.endlineno is None:
            return
        if path not in self._files:
            self._files[path] = _comments(path)
        comments, lines = self._files[path]
        text = comments.get(attr.endlineno)
        if not text:
            return
        parts = [text]
        for line in lines[attr.endlineno:]:
            more = CONTINUATION.match(line)
            if not more:
                break
            parts.append(more["text"].strip())
        template = pkg.docstring
        attr.docstring = griffe.Docstring(" ".join(parts), lineno=attr.endlineno, parent=attr,
                                          parser=template.parser if template else None,
                                          parser_options=template.parser_options if template else None)
