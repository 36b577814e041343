"""The two contenders, timed the same way (until the bench's own watch has seen every pod): a bare client
POSTing the pods, and the real operator making them from LLMTrainingJobs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .api import JOB_LABEL, STRATEGIC, Watch, check, gather_limited, get, jobs_url, pods_url, until
from .meters import CpuMeter, Operator, api_counts, api_diff, settle
from .workload import create_jobs


@dataclass
class Arena:
    """Where one contender works and what it is given; the same for both contenders of a run."""

    http: aiohttp.ClientSession
    ns: str
    jobs: int
    workers: int
    concurrency: int
    meter: CpuMeter
    metrics_port: int
    settle_seconds: float

    @property
    def pods(self) -> int:
        return self.jobs * self.workers


# --- the baseline ------------------------------------------------------------------------------------------


async def bare_client(a: Arena) -> dict[str, Any]:
    """pods/s of plain POSTs of the operator's own rendering of the same pods (for N real jobs, so their
    ownerReferences hold and the garbage collector has the same work)."""
    from kubetrain_operator.controller import job_view
    from kubetrain_operator.render import render_pod

    views = [job_view(body) for body in await create_jobs(a.http, a.ns, a.jobs, a.workers, a.concurrency,
                                                          a.metrics_port)]
    bodies = [render_pod(v.ref, v.spec, i) for v in views if v.spec is not None for i in range(a.workers)]
    assert len(bodies) == a.pods, [v.error for v in views if v.spec is None][:1]

    async def create(body: dict[str, Any]) -> None:
        async with a.http.post(pods_url(a.ns), json=body) as resp:
            await check(resp, 201)

    idle = await settle(a.settle_seconds)
    # Timed as the operator is: until the bench's own watch has seen every pod (the same watch runs in both).
    async with Watch(a.http, pods_url(a.ns), labelSelector=JOB_LABEL) as pod_watch:
        before = await api_counts(a.http)
        a.meter.start()
        start = time.perf_counter()
        await gather_limited(a.concurrency, [create(b) for b in bodies])
        done = await pod_watch.until(lambda objects: len(objects) >= len(bodies), 60)
        cpu = a.meter.stop()
    seconds = done - start
    return {"pods_per_second": len(bodies) / seconds, "seconds": seconds, "cpu_seconds": cpu,
            "busy_before": idle, "api": api_diff(before, await api_counts(a.http))}


# --- the operator ------------------------------------------------------------------------------------------


async def operator_run(a: Arena, kubeconfig: Path, timeout: float, log: Path,
                       pod_ip: str | None) -> dict[str, Any]:
    """The real operator in its own process: jobs created until every pod is seen, then (the bench playing
    kubelet) pods Running and Ready until every job's status says so, then the operator's own counters."""
    idle = await settle(a.settle_seconds)
    op = Operator(kubeconfig, a.ns, log)
    a.meter.add("operator", op.proc.pid)
    result: dict[str, Any] = {"operator_log": str(log), "busy_before": idle}
    try:
        await until("operator serving /metrics", lambda: op.metric("kubetrain_operator_leader"), 60, 0.1)
        await asyncio.sleep(1.0)  # let Kopf's watches start before the jobs arrive
        async with Watch(a.http, pods_url(a.ns), labelSelector=JOB_LABEL) as pod_watch, \
                Watch(a.http, jobs_url(a.ns)) as job_watch:
            after = await _time_creation(a, timeout, pod_watch, result)
            if after is None:  # timed out; the result says how far it got
                return result
            await _time_convergence(a, timeout, pod_ip, pod_watch, job_watch, after, result)
        await _read_counters(op, result)
        return result
    finally:
        # Deleted while the operator runs, so that Kopf stops the daemons and removes its finalizers.
        result.setdefault("operator_peak_rss_mib", op.peak_rss / 2**20)
        async with a.http.delete(jobs_url(a.ns)) as resp:
            await check(resp, 200, 404)
        with contextlib.suppress(TimeoutError):
            await until("jobs deleted", lambda: _no_jobs(a.http, a.ns), 60, every=0.5)
        op.stop()


async def _time_creation(a: Arena, timeout: float, pod_watch: Watch, result: dict[str, Any]) -> dict[str, float] | None:
    """From creating the jobs to the watch seeing all their pods, into `result`; returns the API server's
    counters at the end, or None when not all pods came within `timeout`."""
    before = await api_counts(a.http)
    a.meter.start()
    start = time.perf_counter()
    await create_jobs(a.http, a.ns, a.jobs, a.workers, a.concurrency, a.metrics_port)
    result["jobs_created_seconds"] = time.perf_counter() - start
    try:
        done = await pod_watch.until(lambda objects: len(objects) >= a.pods, timeout)
    except asyncio.TimeoutError:  # report how far it got instead of nothing
        made = len(pod_watch.objects)
        result.update(seconds_to_all_pods=None, pods_created=made,
                      pods_per_second=made / (time.perf_counter() - start),
                      cpu_seconds_creating=a.meter.stop(), timed_out=True)
        return None
    result.update(seconds_to_all_pods=done - start, pods_per_second=a.pods / (done - start),
                  cpu_seconds_creating=a.meter.stop())
    after = await api_counts(a.http)
    result["api_creating"] = api_diff(before, after)
    return after


async def _time_convergence(a: Arena, timeout: float, pod_ip: str | None, pod_watch: Watch, job_watch: Watch,
                            api_before: dict[str, float], result: dict[str, Any]) -> None:
    """Every pod turned Running and Ready, then the time until every job's status counts them, into `result`."""
    names = sorted(pod_watch.objects)
    result["pods_listed"] = len(names)
    a.meter.start()
    patched = time.perf_counter()
    ok = await gather_limited(a.concurrency, [_play_kubelet(a.http, a.ns, n, pod_ip) for n in names])
    last_change = time.perf_counter()
    result["status_patches_seconds"] = last_change - patched
    result["pods_gone_before_patch"] = ok.count(False)  # deleted by the operator meanwhile (restarts)
    try:
        converged = await job_watch.until(_ready(a.workers, a.jobs), timeout)
        result["status_converged_seconds"] = max(0.0, converged - last_change)
    except asyncio.TimeoutError:
        result["status_converged_seconds"] = None
    result["cpu_seconds_converging"] = a.meter.stop()
    result["api_converging"] = api_diff(api_before, await api_counts(a.http))
    result["pods_total_created"] = pod_watch.added


async def _play_kubelet(http: aiohttp.ClientSession, ns: str, name: str, pod_ip: str | None) -> bool:
    """What a kubelet reports once the trainer is up; False if the pod is gone already."""
    ips = {"podIP": pod_ip, "podIPs": [{"ip": pod_ip}]} if pod_ip else {}
    body = {"status": {"phase": "Running", **ips, "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    async with http.patch(f"{pods_url(ns)}/{name}/status", json=body, headers=STRATEGIC) as resp:
        await check(resp, 200, 404)
        return resp.status == 200


async def _read_counters(op: Operator, result: dict[str, Any]) -> None:
    result["pods_created"] = int(await op.metric("kubetrain_operator_pods_created_total"))
    result["operator_peak_rss_mib"] = op.peak_rss / 2**20
    for key, name in (("operator_errors", "errors"), ("operator_restarts", "restarts"),
                      ("pods_deleted", "pods_deleted")):
        result[key] = int(await op.metric(f"kubetrain_operator_{name}_total"))


def _ready(workers: int, jobs: int) -> Callable[[dict[str, dict[str, Any]]], bool]:
    def check(objects: dict[str, dict[str, Any]]) -> bool:
        return len(objects) == jobs and all(((o.get("status") or {}).get("workers") or {}).get("ready") == workers
                                            for o in objects.values())

    return check


async def _no_jobs(http: aiohttp.ClientSession, ns: str) -> bool:
    return not ((await get(http, jobs_url(ns)) or {}).get("items"))
