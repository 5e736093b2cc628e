"""Compute threads fitted to the cores this process can actually use.

More compute threads than free cores make every parallel operation wait for a thread that is not
running (on 2 cores beside one CPU-bound process, medtl's loop ran 2.4-2.6x slower than alone with 2
threads, 1.6-1.7x with 1; see docs/performance.md). So torch's thread count follows the usable cores:
the CPU affinity, lowered to a cgroup CPU quota, less the cores other processes keep busy, measured
from ``/proc/stat``. ``MEDTL_THREADS`` fixes the count; a user's ``OMP_NUM_THREADS`` is respected; a
count the program set itself is left alone.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medtl.errors import ConfigError

log = logging.getLogger("medtl.threads")

THREADS_ENV = "MEDTL_THREADS"  # a fixed number of compute threads (otherwise fitted to the free cores)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cgroup_dirs(root: Path) -> list[Path]:
    """Folders that may hold this process's CPU quota: each CPU cgroup on its path (from /proc/self/cgroup) and
    their parents up to the hierarchy's root (cgroup v2 and v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    dirs: list[Path] = []
    for base in (root, root / "cpu", root / "cpu,cpuacct"):
        dirs.append(base)
        for line in lines:
            _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if controllers and "cpu" not in controllers.split(","):
                continue
            here = base / path.strip().lstrip("/")
            while here != base and base in here.parents:
                dirs.append(here)
                here = here.parent
    return dirs


def cpu_quota(root: str | Path | None = None) -> float | None:
    """Cores' worth of CPU time this process's cgroups allow (the tightest of cgroup v2 ``cpu.max`` and v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` along its cgroup path); None when there is no quota."""
    quotas = []
    for d in _cgroup_dirs(Path(root or CGROUP_ROOT)):
        try:
            if (d / "cpu.max").is_file():
                limit, period = (d / "cpu.max").read_text().split()[:2]
                if limit != "max":
                    quotas.append(int(limit) / int(period))
            elif (d / "cpu.cfs_quota_us").is_file():
                quota_us = int((d / "cpu.cfs_quota_us").read_text())
                if quota_us > 0:
                    quotas.append(quota_us / int((d / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return min(quotas) if quotas else None


def usable_cores(root: str | Path | None = None) -> int:
    """The CPU cores this process may use: its affinity (a container's cpuset, not the host's count), lowered to a
    cgroup CPU quota where one is set (a quota of 1.5 cores gives 1: more threads would be throttled together)."""
    cores = len(_allowed_cpus())
    quota = cpu_quota(root)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def _cpu_busy_ticks(cpus: list[int]) -> float:
    """Busy clock ticks so far (user, nice, system, irq, softirq, steal) summed over ``cpus``, from /proc/stat."""
    wanted, busy = {f"cpu{c}" for c in cpus}, 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (float(v) for v in parts[1:9])
            busy += user + nice + system + irq + softirq + steal
    return busy


def busy_elsewhere(window: float = 0.1) -> float:
    """Cores' worth of CPU that other processes used on this process's allowed cores over the next ``window``
    seconds (measured from /proc/stat, less this process's own CPU time); 0.0 where it cannot be read."""
    cpus = _allowed_cpus()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        b0, own0, t0 = _cpu_busy_ticks(cpus), time.process_time(), time.monotonic()
        time.sleep(window)
        b1, own1, t1 = _cpu_busy_ticks(cpus), time.process_time(), time.monotonic()
    except (OSError, ValueError):
        return 0.0
    return max(0.0, ((b1 - b0) / tick - (own1 - own0)) / max(t1 - t0, 1e-3))


@dataclass
class ThreadChoice:
    """How many compute threads torch uses, and why."""

    threads: int
    reason: str


def choose_threads(cores: int | None = None, busy: float | None = None) -> ThreadChoice:
    """Compute threads for this process: ``MEDTL_THREADS`` if set; else ``OMP_NUM_THREADS`` if the user set it;
    else the usable cores (:func:`usable_cores`) less those other processes keep busy (:func:`busy_elsewhere`,
    rounded), at least one. More compute threads than free cores make every parallel operation wait for a thread
    that is not running: measured on 2 cores beside one CPU-bound process, epochs 10-20x slower than alone."""
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:
        try:
            n = int(forced)
        except ValueError:
            raise ConfigError(None, f"{THREADS_ENV}={forced!r} is not a number of threads", "a whole number") from None
        if n < 1:
            raise ConfigError(None, f"{THREADS_ENV}={forced!r} is not a number of threads", "1 or more")
        return ThreadChoice(n, f"forced by {THREADS_ENV}")
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return ThreadChoice(max(1, int(os.environ["OMP_NUM_THREADS"])), "set by OMP_NUM_THREADS")
    cores = usable_cores() if cores is None else cores
    busy = busy_elsewhere() if busy is None else busy
    others = min(cores - 1, int(busy + 0.5))
    if others <= 0:
        return ThreadChoice(cores, f"{cores} usable core{'s' * (cores > 1)}")
    return ThreadChoice(cores - others, f"{cores} usable cores, {busy:.1f} busy with other processes")


class ThreadFitter:
    """Keeps torch's compute threads fitted to the free cores: :meth:`fit` measures what other processes use at
    most every ``every`` seconds (a measurement takes 0.1 s) and sets ``torch.set_num_threads`` to the answer."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self.last = -float("inf")
        self.busy = 0.0  # cores' worth used by other processes at the last measurement
        self.threads: int | None = None  # the last count set

    def fit(self, measure: bool = True, now: bool = False) -> ThreadChoice:
        """Fit the threads (``measure=False``: to the usable cores, whatever else runs: a fixed, repeatable
        count for deterministic runs; ``now``: measure even if the last measurement is recent). ``MEDTL_THREADS``
        and ``OMP_NUM_THREADS`` are read at every call. A count the program set itself (torch.set_num_threads to
        neither torch's start-up count nor the last one fitted) is left as it is."""
        current = torch.get_num_threads()
        if current not in (self.threads, INITIAL_THREADS):  # the program chose its own count: it stays
            return ThreadChoice(current, "set by the program (torch.set_num_threads)")
        t = time.monotonic()
        if measure and (now or t - self.last >= self.every):
            self.busy, self.last = busy_elsewhere(), t
        choice = choose_threads(busy=self.busy if measure else 0.0)
        if choice.threads != torch.get_num_threads():
            if choice.threads != self.threads:
                log.info("compute threads %d -> %d (%s)", torch.get_num_threads(), choice.threads, choice.reason)
            torch.set_num_threads(choice.threads)
        self.threads = choice.threads
        return choice


INITIAL_THREADS = torch.get_num_threads()  # torch's count when medtl was imported
_FITTER = ThreadFitter()


def fit_threads(measure: bool = True, now: bool = False) -> ThreadChoice:
    """Fit this process's compute threads to the cores free for it (see :func:`choose_threads`); called where
    models run: each training epoch, a predictor's start, an evaluation. Other processes' use is measured at
    most every 30 s, or at once with ``now``."""
    return _FITTER.fit(measure, now)


__all__ = [
    "usable_cores",
    "cpu_quota",
    "busy_elsewhere",
    "choose_threads",
    "ThreadChoice",
    "ThreadFitter",
    "fit_threads",
    "THREADS_ENV",
]
