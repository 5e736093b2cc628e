"""Walking a folder of untrusted files: iteratively, to a bounded depth, without following links.

``Path.rglob`` and ``os.walk`` recurse in Python (3.11): a folder 1,100 levels deep raises RecursionError.
:func:`walk_files` keeps its own stack, refuses a tree deeper than :data:`MAX_DEPTH` levels with a typed
error naming the top folder (never the deep folder's names, which may hold a patient's), does not enter
linked folders (a link to ``/`` or a loop), and stops at ``max_files``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from medtl.errors import InputTooLargeError

MAX_DEPTH = 64  # folder levels under the top one; a study export is 2-6 deep


def walk_files(
    root: str | Path,
    keep: Callable[[str], bool] | None = None,
    max_files: int | None = None,
    max_depth: int = MAX_DEPTH,
) -> list[Path]:
    """The files under ``root`` whose name ``keep(name)`` accepts (all by default), in ``os.walk`` order with
    sorted names: a folder's files, then each sub-folder's, depth first.

    Raises:
        InputTooLargeError: the tree is deeper than ``max_depth`` levels or holds more than ``max_files``
            accepted files.
    """
    root = Path(root)
    out: list[Path] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # unreadable (permissions, vanished): nothing of it is an input
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(Path(entry.path))
                    continue
                if not entry.is_file():
                    continue
            except OSError:
                continue
            if keep is None or keep(entry.name):
                out.append(Path(entry.path))
                if max_files is not None and len(out) > max_files:
                    raise InputTooLargeError(
                        root,
                        f"folder holds more than {max_files} files",
                        "a folder of one study, or raise MEDTL_MAX_INPUT_FILES",
                    )
        if subfolders and depth >= max_depth:
            raise InputTooLargeError(
                root, f"folder is nested more than {max_depth} levels deep", "a folder tree of a study's usual depth"
            )
        stack.extend((f, depth + 1) for f in reversed(subfolders))
    return out


__all__ = ["MAX_DEPTH", "walk_files"]
