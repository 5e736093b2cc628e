"""``medtl runs [DIR]``: a table comparing the runs in a folder, read from each run's saved files.

=============  =================================================================================
run            the run folder's path under DIR
status         ``finished``, or ``interrupted``/``failed``/``running`` at ``epoch/epochs`` (``status.json``)
encoder        ``config.yaml``'s encoder
strategy       the strategy trained (``metrics.json``: ``auto``'s choice), else the configured one
size           input side in pixels (the preprocessing the run resolved)
labels         labelled training images (``metrics.json``)
test AUC       with its 95 % CI: ``medtl evaluate``'s patient bootstrap, else (marked ``~``) the approximate
               interval from the test split's class counts (:func:`medtl.eval.quality.model_quality`)
seconds        the run's training time, resumed sessions included
=============  =================================================================================

The handler imports the run reader (torch) when it runs, not at the top of the module (``medtl --help`` stays
light).
"""

from __future__ import annotations

import argparse
from pathlib import Path

COLUMNS = ("run", "status", "encoder", "strategy", "size", "labels", "test AUC (95% CI)", "seconds")


def add_parser(sub) -> None:
    """``runs`` on ``sub`` (the ``medtl`` parser's sub-commands)."""
    s = sub.add_parser(
        "runs", help="compare the runs in a folder: status, encoder, strategy, size, labels, test AUC with CI, time"
    )
    s.add_argument("folder", nargs="?", type=Path, default=Path("runs"), help="a folder of runs (searched 3 deep)")
    s.set_defaults(fn=cmd_runs)


def find_runs(folder: Path, depth: int = 3) -> list[Path]:
    """The run folders in ``folder`` (itself included), up to ``depth`` levels down, in name order; a run's own
    sub-folders (evaluation, overlays, TensorBoard) are not searched."""
    if (folder / "config.yaml").is_file() or (folder / "status.json").is_file():
        return [folder]
    if depth == 0 or not folder.is_dir():
        return []
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        found += find_runs(child, depth - 1)
    return found


def run_row(path: Path, folder: Path) -> dict[str, str]:
    """One row of the table (``-`` where the run has no such record yet)."""
    from medtl.errors import MedtlError
    from medtl.eval.quality import model_quality
    from medtl.run import RunDir

    run = RunDir(path)
    row = dict.fromkeys(COLUMNS, "-")
    row["run"] = str(path.relative_to(folder)) if path != folder else path.name
    try:
        status = run.read_status()
        raw = run.read_raw_config()
    except MedtlError as e:
        row["status"] = f"unreadable ({type(e).__name__})"
        return row
    row["status"] = status_words(status, run.unfinished())
    resolved = raw.get("resolved") or {}
    metrics = run.read_json(RunDir.METRICS) or {}
    row["encoder"] = str((raw.get("encoder") or {}).get("name", "-"))
    row["strategy"] = str(metrics.get("strategy") or (raw.get("train") or {}).get("strategy", "-"))
    size = (resolved.get("preprocessing") or {}).get("input_size") or (raw.get("encoder") or {}).get("input_size")
    row["size"] = str(size) if size else "-"
    if metrics:
        row["labels"] = str((metrics.get("train") or {}).get("n_images", "-"))
        row["seconds"] = f"{metrics['seconds']:.0f}" if isinstance(metrics.get("seconds"), (int, float)) else "-"
        quality = model_quality(path)
        if quality.auc is not None:
            ci = quality.auc_ci
            row["test AUC (95% CI)"] = f"{quality.auc:.3f}" + (
                f" ({ci[0]:.3f}-{ci[1]:.3f}){'' if quality.evaluated else '~'}" if ci else ""
            )
    return row


def status_words(status: dict | None, unfinished: str | None) -> str:
    """``finished``; ``interrupted 3/10`` (the epochs done of those planned) and the like."""
    if status is None:
        return "incomplete" if unfinished else "finished"
    if status["state"] == "finished":
        return "finished"
    state = status["state"]
    if state == "running" and unfinished and "still running" not in unfinished:
        state = "interrupted"  # (its process is gone: killed without a word)
    epochs = f" {status.get('epoch') or 0}/{status['epochs']}" if status.get("epochs") else ""
    return state + epochs


def format_table(rows: list[dict[str, str]]) -> str:
    """The rows as aligned text columns (numbers right-aligned)."""
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    right = {"size", "labels", "seconds"}

    def line(values: dict[str, str]) -> str:
        cells = [values[c].rjust(widths[c]) if c in right else values[c].ljust(widths[c]) for c in COLUMNS]
        return "  ".join(cells).rstrip()

    return "\n".join([line({c: c for c in COLUMNS})] + [line(r) for r in rows])


def cmd_runs(args: argparse.Namespace) -> int:
    from medtl.errors import FileMissingError

    folder = args.folder
    if not folder.is_dir():
        raise FileMissingError(folder, "no such folder of runs")
    paths = find_runs(folder)
    if not paths:
        print(f"{folder}: no runs (folders holding config.yaml or status.json)")
        return 0
    rows = [run_row(p, folder) for p in paths]
    print(format_table(rows))
    if any(r["test AUC (95% CI)"].endswith("~") for r in rows):
        print("~ approximate interval from the test class counts; medtl evaluate RUN gives the patient bootstrap")
    return 0
