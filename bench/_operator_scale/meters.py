"""What the bench reads while a contender runs: CPU of the processes involved, the API server's own
counters, how busy the machine is, and the operator process (its metrics and peak RSS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil

from .target import free_port


class CpuMeter:
    """CPU seconds of named processes and of the whole machine between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.procs["bench"] = psutil.Process()
        self._start: dict[str, float] = {}

    def add(self, name: str, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self.procs[name] = psutil.Process(pid)

    def _now(self) -> dict[str, float]:
        values = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                values[name] = t.user + t.system
        t = psutil.cpu_times()
        values["machine"] = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        values["wall"] = time.perf_counter()
        return values

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        used = {k: end[k] - self._start[k] for k in end if k in self._start}
        used["others"] = used["machine"] - sum(v for k, v in used.items() if k not in ("machine", "wall"))
        return {k: round(v, 2) for k, v in used.items()}


async def api_counts(http: aiohttp.ClientSession) -> dict[str, float]:
    """The API server's own counters: requests by client, verb and resource, and watch events sent by resource
    (its /metrics; {} when the identity may not read it)."""
    async with http.get("/metrics") as resp:
        if resp.status != 200:
            return {}
        text = await resp.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("apiserver_request_total{", "apiserver_watch_events_total{")):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            if line.startswith("apiserver_request_total"):
                key = f"{labels.get('system_client') or 'bench/operator'} {labels.get('verb')} {resource}"
            else:
                key = f"watch events {resource}"
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def api_diff(before: dict[str, float], after: dict[str, float], top: int = 12) -> dict[str, int]:
    """The `top` largest counts of what happened between two api_counts()."""
    diff = {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0) >= 1}
    return dict(sorted(diff.items(), key=lambda kv: -kv[1])[:top])


async def settle(max_wait: float, busy: float = 0.15) -> float:
    """Wait until the machine is < `busy` busy over 2 s (the control plane done with the last phase's
    aftermath, other processes quiet), at most `max_wait` s; returns the busy fraction it ended at."""
    deadline = time.monotonic() + max_wait
    psutil.cpu_percent(None)
    while True:
        await asyncio.sleep(2.0)
        load = psutil.cpu_percent(None) / 100
        if load < busy or time.monotonic() > deadline:
            return load


def operator_metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


class Operator:
    """`kubetrain operator -n NS` in its own process; its RSS sampled every 50 ms while it runs."""

    def __init__(self, kubeconfig: Path, ns: str, log: Path):
        self.port = free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubetrain_cli", "operator", "-n", ns, "--metrics-port",
                                      str(self.port), "--liveness-port", "0"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0
        self._sampler = asyncio.ensure_future(self._sample())

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            await asyncio.sleep(0.05)

    async def metric(self, name: str) -> float:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, operator_metric, self.port, name) or 0.0

    def stop(self) -> None:
        self._sampler.cancel()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
