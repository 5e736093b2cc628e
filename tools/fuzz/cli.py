"""The fuzz run's command line: ``python -m tools.fuzz`` (from the repository root)."""

import argparse
import json
import sys
from pathlib import Path

import tools.fuzz
from tools.fuzz.report import format_report
from tools.fuzz.runner import DEFAULT_READER, parse_budget, run
from tools.fuzz.seeds import default_data_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.fuzz",
        description=tools.fuzz.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=10000, help="mutants to make and read (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="run seed: mutant i is the same for the same seed (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="mutants read at once (default 2)")
    p.add_argument("--budget", default="2G", help="memory budget per read, e.g. 512M (default 2G)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a read counts as hung (default 10)")
    p.add_argument(
        "--data", type=Path, default=None, help="real data folder (default $MEDTL_SHARED_DATA or ../shared/data)"
    )
    p.add_argument(
        "--seeds",
        choices=("generated", "data", "both"),
        default=None,
        help="seed files (default both where the data folder exists, else generated)",
    )
    p.add_argument("--out", type=Path, default=Path("results/fuzz"))
    p.add_argument("--keep-failures", action="store_true", help="copy failing mutants to OUT/failures/")
    p.add_argument("--replay", type=Path, help="re-read the mutants recorded in a failures.jsonl")
    p.add_argument("--reader", default=DEFAULT_READER, help=argparse.SUPPRESS)
    p.add_argument("--log", type=Path, help="append the servers' stderr (reader warnings) to this file")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    data = args.data or default_data_dir()
    seeds = args.seeds or ("both" if data and data.is_dir() else "generated")
    recipes = None
    if args.replay:
        recipes = [json.loads(line) for line in args.replay.read_text().splitlines() if line.strip()]
    budget = parse_budget(args.budget)
    print(
        f"fuzzing {len(recipes) if recipes else args.n} mutants (run seed {args.seed}, seeds {seeds}"
        + (f" from {data}" if seeds != "generated" else "")
        + f", {args.jobs} jobs, budget {args.budget}, "
        f"timeout {args.timeout:g} s)",
        flush=True,
    )
    report = run(
        args.n,
        args.seed,
        args.jobs,
        budget,
        args.timeout,
        seeds,
        data if seeds != "generated" else None,
        args.out,
        args.keep_failures,
        args.reader,
        recipes,
        log=args.log,
    )
    print()
    print(format_report(report))
    print(
        f"\nwrote {args.out}/summary.md, summary.json, failures.jsonl, results.jsonl"
        + (f" and failures/ ({len(report['failures'])} files)" if args.keep_failures else "")
    )
    return report["exit_status"]
