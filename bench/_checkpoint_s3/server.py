"""The machine and the server: moto_server with its memory and CPU, the meter of each phase, and the wait
for a quiet machine (other engineers run tests on the same 2 cores)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from _machine import busy_fraction, cpu_jiffies
from support.s3 import MotoServer

from . import REPO


class Moto(MotoServer):
    """The tests' moto_server (tests/support/s3.py), plus the server's memory and CPU for the report."""

    def _status(self, field: str) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
        return float("nan")

    def rss_gb(self) -> float:
        return self._status("VmRSS")

    def peak_rss_gb(self) -> float:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Meter:
    """Wall time of a phase, and the CPU that processes other than this one and moto took meanwhile
    (as a share of the machine): other engineers' tests on the same 2 cores would show up here."""

    def __init__(self, moto: Moto):
        self.moto = moto

    def __enter__(self) -> Meter:
        self._busy0, _ = cpu_jiffies()
        self._server0 = self.moto.cpu_seconds()
        self._own0 = _self_cpu() + self._server0
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        busy1, _ = cpu_jiffies()
        server = self.moto.cpu_seconds()
        self.server_cpu = server - self._server0
        own = _self_cpu() + server - self._own0
        foreign = max(0.0, (busy1 - self._busy0) / os.sysconf("SC_CLK_TCK") - own)
        self.foreign_share = foreign / max(1e-9, self.seconds * (os.cpu_count() or 1))


def wait_for_quiet(max_load: float, max_wait: float, max_busy: float = 0.25) -> float:
    """Wait until the 1-minute load average is at most max_load and the machine is at most max_busy
    busy right now (the load average lags by a minute or more); returns the load average."""
    deadline = time.monotonic() + max_wait
    load, busy = os.getloadavg()[0], busy_fraction()
    if load > max_load or busy > max_busy:
        print(f"  1-minute load {load:.2f}, {busy:.0%} busy: waiting up to {max_wait:.0f}s for load <= {max_load} "
              f"and busy <= {max_busy:.0%} ...", flush=True)
    while (load > max_load or busy > max_busy) and time.monotonic() < deadline:
        time.sleep(8)
        load, busy = os.getloadavg()[0], busy_fraction()
    if load > max_load or busy > max_busy:
        print(f"  still load {load:.2f}, {busy:.0%} busy after {max_wait:.0f}s; measuring anyway (results flagged)",
              flush=True)
    return load


def machine() -> dict[str, Any]:
    import boto3
    import moto
    import torch

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal")).split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "boto3": boto3.__version__, "moto": moto.__version__, "code": _trainer_code()}


def _trainer_code() -> str:
    """The commit the checkpoint code comes from (only trainer/ matters here, unlike _machine.code_version)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return f"git {head}" + (" + uncommitted changes under trainer/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
