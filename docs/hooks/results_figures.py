"""MkDocs hook: the studies' figures (``results/**/*.png``) are served from where the pipelines wrote them.

A results page links a figure by its path in the repository, relative to the page:
``docs/results/breastmnist-label-efficiency.md`` shows ``breastmnist_64/learning_curve.png``, which is
``results/breastmnist_64/learning_curve.png``. No copy of a figure is kept under ``docs/``, so the site
always shows the committed one, and a figure that is gone fails the strict build as a broken link.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]  # the repository (docs/hooks/ -> docs/ -> root)


def on_files(files: Files, config, **kwargs) -> Files:
    for png in sorted((ROOT / "results").rglob("*.png")):
        path = png.relative_to(ROOT).as_posix()
        if files.get_file_from_path(path) is None:
            files.append(File(path, src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
