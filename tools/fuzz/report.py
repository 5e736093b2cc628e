"""The report of a fuzz run: outcome counts per seed kind and mutator family, failure signatures, peak memory;
printed as markdown and written as summary.md, summary.json, failures.jsonl and results.jsonl."""

import json
from collections import Counter
from pathlib import Path

from tools.fuzz.registry import FAMILIES
from tools.fuzz.seeds import KINDS

OUTCOMES = ("read", "typed", "other", "timeout", "killed")
BAD = ("other", "timeout", "killed")


def _row(label: str, rs: list[dict], secs: float | None = None) -> dict:
    c = Counter(r["outcome"] for r in rs)
    return {
        "rows": label,
        "mutants": len(rs),
        **{o: c[o] for o in OUTCOMES},
        "peak_mib": round(max((r.get("peak_kib", 0) for r in rs), default=0) / 1024, 1),
        "seconds": round(sum(r.get("seconds", 0) for r in rs) if secs is None else secs, 1),
    }


def _table(results: list[dict], seconds: float) -> list[dict]:
    """A row per seed kind and per mutator family present, and the total (with the wall time)."""
    table = [
        _row(f"kind {k}", [r for r in results if r["kind"] == k]) for k in KINDS if any(r["kind"] == k for r in results)
    ]
    table += [
        _row(f"family {f}", [r for r in results if r["family"] == f])
        for f in FAMILIES
        if any(r["family"] == f for r in results)
    ]
    table.append(_row("total", results, seconds))
    return table


def _signatures(failures: list[dict], budget: int) -> list[dict]:
    """The failures grouped by (outcome, error, medtl location), or by mutator when only over the budget."""
    groups: dict[tuple, list[dict]] = {}
    for r in failures:
        if r["outcome"] in BAD:
            key = (r["outcome"], r.get("error", ""), r.get("location", ""))
        else:  # read or refused, but over the budget on the way
            key = ("over budget", f"{r['outcome']} {r.get('error', '')}".strip(), r["mutator"])
        groups.setdefault(key, []).append(r)

    def message(r):
        if r["outcome"] in BAD:
            return r.get("message", "")
        return f"peak {r['peak_kib'] / 1024:.0f} MiB, budget {budget / 2**20:.0f} MiB"

    return [
        {
            "outcome": k[0],
            "error": k[1],
            "location": k[2],
            "count": len(v),
            "where": v[0].get("where", ""),
            "message": message(max(v, key=lambda r: r.get("peak_kib", 0))),
            "mutators": dict(Counter(x["mutator"] for x in v).most_common()),
            "example": {x: v[0][x] for x in ("run_seed", "index", "seed", "mutator", "details")},
        }
        for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]


def summarize(results: list[dict], budget: int, seconds: float, meta: dict) -> dict:
    """Counts per seed kind and mutator family, failure signatures and the peak memory."""
    table = _table(results, seconds)
    failures = [r for r in results if r["outcome"] in BAD or r.get("over_budget")]
    peak = max(results, key=lambda r: r.get("peak_kib", 0), default={})
    typed = Counter(
        r["error"] + (f" (from {r['cause']})" if r.get("cause") in ("MemoryError", "RecursionError") else "")
        for r in results
        if r["outcome"] == "typed"
    )
    fallbacks = Counter(r["mutator"] for r in results if "fallback" in r.get("details", {}))
    return {
        **meta,
        "budget_bytes": budget,
        "seconds": round(seconds, 1),
        "table": table,
        "outcomes": {o: table[-1][o] for o in OUTCOMES},
        "peak_mib": table[-1]["peak_mib"],
        "peak_index": peak.get("index"),
        "within_budget": not any(r.get("over_budget") for r in results),
        "typed": dict(typed.most_common()),
        "fallbacks": dict(fallbacks.most_common()),
        "signatures": _signatures(failures, budget),
        "failures": failures,
        "results": results,
        "exit_status": 1 if failures else 0,
    }


def format_table(report: dict) -> str:
    cols = ["rows", "mutants", *OUTCOMES, "peak_mib", "seconds"]
    head = ["rows", "mutants", *OUTCOMES, "peak MiB", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in report["table"]:
        cells = [f"**{r[c]}**" if r["rows"] == "total" and c == "rows" else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_signatures(report: dict) -> list[str]:
    if not report["signatures"]:
        return ["", "no failures: every mutant was read or refused with a typed error, in budget"]
    out = ["", f"failure signatures ({len(report['signatures'])} distinct, {len(report['failures'])} mutants):"]
    for s in report["signatures"]:
        ex = s["example"]
        at = f"mutator {s['location']}" if s["outcome"] == "over budget" else s["location"] or s["where"] or "?"
        out.append(f"  {s['count']:5d}  {s['outcome']}: {s['error']} at {at}  [{s['message'][:100]}]")
        out.append(
            f"         e.g. mutant {ex['index']} (seed {ex['run_seed']}): {ex['mutator']} on {ex['seed']} "
            f"{json.dumps(ex['details'])[:160]}"
        )
    return out


def format_report(report: dict) -> str:
    """The table, the peak memory, the typed refusals and the failure signatures, as printed."""
    budget_mib = report["budget_bytes"] / 2**20
    out = [
        format_table(report),
        "",
        "(seconds: time spent reading, summed over the row's mutants; total: wall time)",
        f"peak memory: max {report['peak_mib']:.1f} MiB (mutant {report['peak_index']}), "
        f"budget {budget_mib:.0f} MiB: " + ("within budget" if report["within_budget"] else "OVER BUDGET"),
        "typed refusals: " + (", ".join(f"{k} {v}" for k, v in report["typed"].items()) or "none"),
    ]
    if report["fallbacks"]:
        out.append(
            "mutators that fell back to bit flips (seed lacked what they edit): "
            + ", ".join(f"{k} {v}" for k, v in report["fallbacks"].items())
        )
    return "\n".join(out + _format_signatures(report))


def write_outputs(report: dict, out: Path) -> None:
    """OUT/summary.md, summary.json (the report less its rows), failures.jsonl and results.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(
        f"# Reader fuzzing: {report['n']} mutants, run seed {report['seed']}\n\n" + format_report(report) + "\n"
    )
    summary = {k: v for k, v in report.items() if k not in ("failures", "results")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "failures.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in report["failures"])
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in report["results"])
