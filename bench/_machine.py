"""Shared by the CPU benchmarks: detect other load on the machine, so a contended measurement is
flagged (and retried) instead of silently reported. Linux only (/proc/stat)."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def busy_fraction(seconds: float = 2.0) -> float:
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def wait_idle(threshold: float = 0.10, timeout: float = 600.0, log=print) -> float:
    """Wait until the whole machine is below `threshold` busy over a 2 s window; returns the last
    busy fraction seen (which may still be above the threshold when `timeout` ran out)."""
    deadline = time.monotonic() + timeout
    frac = busy_fraction()
    announced = False
    while frac > threshold and time.monotonic() < deadline:
        if not announced:
            log(f"  (machine {frac:.0%} busy with other work; waiting for it to go idle ...)")
            announced = True
        frac = busy_fraction()
    if frac > threshold:
        log(f"  (still {frac:.0%} busy after {timeout:.0f}s; measuring anyway, result flagged)")
    return frac


@dataclass
class Contention:
    wall: float
    own_cpu: float  # CPU seconds of this process and its waited-for descendants
    foreign_cpu: float  # CPU seconds spent by anything else on the machine meanwhile

    @property
    def foreign_share(self) -> float:
        """Other work as a fraction of the machine's capacity during the measurement."""
        return self.foreign_cpu / max(1e-9, self.wall * (os.cpu_count() or 1))

    def describe(self) -> str:
        return f"other load {self.foreign_share:.0%} of the machine"


class CpuMeter:
    """with CpuMeter() as m: ...  then m.result: how much CPU went to things that are not ours."""

    def __enter__(self) -> CpuMeter:
        self._b0, self._t0 = cpu_jiffies()
        self._own0 = _children_cpu() + _self_cpu()
        self._w0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        b1, _ = cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self._w0
        own = _children_cpu() + _self_cpu() - self._own0
        self.result = Contention(wall, own, max(0.0, (b1 - self._b0) / hz - own))


def code_version() -> str:
    """The commit the trainer code comes from, and whether it had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "cli", "operator"], cwd=_REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {head}" + (" + uncommitted changes under trainer/cli/operator" if dirty else "")
