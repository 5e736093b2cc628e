"""A fuzz run: make ``n`` mutants (or replay recipes), read each on one of ``jobs`` warm servers, report."""

import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from medtl.io.limits import parse_bytes
from tools.fuzz.recipes import make_mutant, plan
from tools.fuzz.report import BAD, OUTCOMES, summarize, write_outputs
from tools.fuzz.seeds import Seed, load_seeds
from tools.fuzz.server import Server

DEFAULT_READER = "tools.fuzz.readers:read_input"
RECIPE_KEYS = ("run_seed", "index", "seed", "kind", "family", "mutator")


def parse_budget(text: str | int) -> int:
    """A memory budget in bytes: an int, or text such as ``2G`` or ``512M``."""
    if isinstance(text, int):
        return text
    return parse_bytes(text, "--budget")


def _check_recipes(recipes: list[dict], by_id: dict[str, Seed]) -> None:
    missing = sorted({r["seed"] for r in recipes} - set(by_id))
    if missing:
        raise SystemExit(
            f"recipes name seeds that this run does not have: {', '.join(missing[:5])} "
            "(give the same --seeds and --data as the run that recorded them)"
        )


def _warm_files(folder: Path, seeds: list[Seed]) -> list[str]:
    """Files the servers read once before the run (the generated seeds and 12 small real ones), so the readers'
    lazy imports happen before any read is timed."""
    folder.mkdir()
    generated = [x for x in seeds if x.id.startswith("gen:")]
    real = sorted((x for x in seeds if x.id.startswith("data:") and len(x.data) < 1 << 20), key=lambda x: x.id)[:12]
    warm: list[str] = []
    for s in generated + real:
        p = folder / f"w{len(warm):03d}{s.suffix}"
        p.write_bytes(s.data)
        warm.append(str(p))
    return warm


class MutantQueue:
    """The recipes, shared by one thread per server: each makes the next mutant, reads it, records the row."""

    def __init__(
        self,
        recipes: list[dict],
        by_id: dict[str, Seed],
        folder: Path,
        timeout: float,
        budget: int,
        failures: Path | None,
        progress: Callable | None,
        t_start: float,
    ):
        self.recipes, self.by_id, self.folder = recipes, by_id, folder
        self.timeout, self.budget, self.failures = timeout, budget, failures
        self.progress, self.t_start = progress, t_start
        self.todo = iter(recipes)
        self.lock = threading.Lock()
        self.results: list[dict] = []
        self.errors: list[BaseException] = []
        self.step = max(1, len(recipes) // 10)

    def run(self, servers: list[Server]) -> list[dict]:
        """Every recipe read, the rows in recipe order; a harness error stops all threads and is raised."""
        threads = [threading.Thread(target=self._thread, args=(s,), daemon=True) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        return sorted(self.results, key=lambda r: r["index"])

    def _thread(self, server: Server) -> None:
        try:
            server.start()
            while (recipe := self._next()) is not None:
                self._record(self._read(server, recipe))
        except BaseException as e:  # a harness bug: stop the others, and run() raises it
            self.errors.append(e)
            with self.lock:
                for _ in self.todo:
                    pass

    def _next(self) -> dict | None:
        with self.lock:
            return next(self.todo, None)

    def _read(self, server: Server, recipe: dict) -> dict:
        """Make the recipe's mutant, read it, and its row (with a copy of the file in ``failures`` if it failed)."""
        data, details, name = make_mutant(recipe, self.by_id)
        path = self.folder / name
        path.write_bytes(data)
        res = server.read(path, self.timeout)
        row = {**{k: recipe[k] for k in RECIPE_KEYS}, "details": details, "size": len(data), **res}
        row["over_budget"] = row.get("peak_kib", 0) * 1024 > self.budget
        if self.failures is not None and (row["outcome"] in BAD or row["over_budget"]):
            shutil.copy(path, self.failures / name)
        path.unlink(missing_ok=True)
        return row

    def _record(self, row: dict) -> None:
        with self.lock:
            self.results.append(row)
            done, total = len(self.results), len(self.recipes)
            if self.progress and (done % self.step == 0 or done == total):
                c = Counter(x["outcome"] for x in self.results)
                self.progress(
                    f"  {done}/{total} mutants: "
                    + ", ".join(f"{c[o]} {o}" for o in OUTCOMES)
                    + f" [{time.monotonic() - self.t_start:.0f} s]",
                    flush=True,
                )


def run(
    n: int = 1000,
    seed: int = 0,
    jobs: int = 2,
    budget: str | int = "2G",
    timeout: float = 10.0,
    seeds: str = "generated",
    data: Path | None = None,
    out: Path | None = None,
    keep_failures: bool = False,
    reader: str = DEFAULT_READER,
    recipes: list[dict] | None = None,
    progress: Callable | None = print,
    log: Path | None = None,
) -> dict:
    """Make and read ``n`` mutants (or the given ``recipes``); return the report (see
    :func:`tools.fuzz.report.summarize`), also written to ``out`` when given."""
    budget_bytes = parse_budget(budget)
    t_start = time.monotonic()
    seed_list = load_seeds(seeds, data)
    by_id = {s.id: s for s in seed_list}
    if recipes is None:
        recipes = [plan(seed, i, seed_list) for i in range(n)]
    _check_recipes(recipes, by_id)
    failures = Path(out) / "failures" if keep_failures and out is not None else None
    if failures is not None:
        failures.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medtl-fuzz-"))
    servers: list[Server] = []
    try:
        warm = _warm_files(work / "warm", seed_list) if reader == DEFAULT_READER else []
        (work / "mutants").mkdir()
        servers += [Server(reader, budget_bytes, warm, log, scratch=work / "tmp") for _ in range(max(1, jobs))]
        queue = MutantQueue(recipes, by_id, work / "mutants", timeout, budget_bytes, failures, progress, t_start)
        results = queue.run(servers)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = summarize(
        results,
        budget_bytes,
        time.monotonic() - t_start,
        {
            "n": len(recipes),
            "seed": seed,
            "jobs": jobs,
            "timeout": timeout,
            "seeds": seeds,
            "data": str(data) if data else None,
            "reader": reader,
            "seed_files": dict(Counter(s.kind for s in seed_list)),
        },
    )
    if out is not None:
        write_outputs(report, Path(out))
    return report
