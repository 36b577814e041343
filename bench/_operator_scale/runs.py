"""Runs: both contenders in fresh namespaces, the order alternating from run to run; a run is measured
again while other processes disturb it, and the least disturbed attempt is kept."""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from .api import create_namespace, delete_crd, delete_namespace, ensure_crd, session
from .contenders import Arena, bare_client, operator_run
from .meters import CpuMeter
from .report import AIMS, DISTURBED, report_run
from .target import bench_address, control_plane, progress_server


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="kubetrain-bench-operator-"))
    with bench_address() as pod_ip, control_plane(args.kubeconfig) as (kubeconfig, pids, target):
        async with session(kubeconfig, args.concurrency) as http, progress_server(pod_ip) as metrics_port:
            crd_created = await ensure_crd(http)
            try:
                bed = _Bed(args, http, kubeconfig, pids, logs, pod_ip if metrics_port else None, metrics_port)
                runs = [await bed.best_attempt(r) for r in range(args.runs)]
            finally:
                if crd_created and args.kubeconfig:
                    await delete_crd(http)
    return {"target": target, "jobs": args.jobs, "workers": args.workers, "concurrency": args.concurrency,
            "timeout": args.timeout, "cpus": psutil.cpu_count(), "pod_ip": pod_ip if metrics_port else None,
            "runs": runs, "aims": AIMS}


class _Bed:
    """The cluster, session and settings that every run of one measurement shares."""

    def __init__(self, args: argparse.Namespace, http: aiohttp.ClientSession, kubeconfig: Path,
                 pids: dict[str, int], logs: Path, pod_ip: str | None, metrics_port: int):
        self.args, self.http, self.kubeconfig, self.pids, self.logs = args, http, kubeconfig, pids, logs
        self.pod_ip, self.metrics_port = pod_ip, metrics_port

    async def best_attempt(self, r: int) -> dict[str, Any]:
        """Run `r`, measured again (at most --retries times) while other processes disturb it."""
        attempts: list[dict[str, Any]] = []
        for attempt in range(1 + self.args.retries):
            run = await self.attempt(r, attempt)
            print(report_run(run, self.args.jobs, self.args.workers), file=sys.stderr, flush=True)
            attempts.append(run)
            if not run["disturbed"]:
                break
        best = min(attempts, key=lambda a: a["others_share"])
        best["disturbed_attempts"] = [{k: a[k] for k in ("attempt", "others_share", "ratio_to_bare")}
                                      for a in attempts if a is not best]
        return best

    async def attempt(self, r: int, attempt: int) -> dict[str, Any]:
        """Both contenders once, each in a namespace of its own; the first of them alternates between runs."""
        meter = CpuMeter(self.pids)
        tag = secrets.token_hex(3)
        prefix = self.args.namespace_prefix
        namespaces = {"bare": f"{prefix}-{tag}-bare", "operator": f"{prefix}-{tag}-op"}
        order = ["bare", "operator"] if r % 2 == 0 else ["operator", "bare"]
        run: dict[str, Any] = {"run": r + 1, "attempt": attempt + 1, "order": order}
        for contender in order:
            ns = namespaces[contender]
            await create_namespace(self.http, ns)
            try:
                run[contender] = await self.contend(contender, ns, meter, r, attempt)
            finally:
                await delete_namespace(self.http, ns, self.args.concurrency)
        run["ratio_to_bare"] = run["operator"]["pods_per_second"] / run["bare"]["pods_per_second"]
        run["others_share"] = others_share(run)
        run["disturbed"] = run["others_share"] > DISTURBED
        return run

    async def contend(self, contender: str, ns: str, meter: CpuMeter, r: int, attempt: int) -> dict[str, Any]:
        args = self.args
        arena = Arena(self.http, ns, args.jobs, args.workers, args.concurrency, meter, self.metrics_port,
                      args.settle)
        if contender == "bare":
            return await bare_client(arena)
        return await operator_run(arena, self.kubeconfig, args.timeout,
                                  self.logs / f"operator-{r + 1}-{attempt + 1}.log", self.pod_ip)


def others_share(run: dict[str, Any]) -> float:
    """The largest share of the machine that other processes (not the bench, the operator or the control plane)
    took in one of the run's timed phases."""
    phases = [run["bare"]["cpu_seconds"], *(run["operator"].get(k) for k in ("cpu_seconds_creating",
                                                                               "cpu_seconds_converging"))]
    cpus = psutil.cpu_count() or 1
    return max(c["others"] / (c["wall"] * cpus) for c in phases if c is not None)
