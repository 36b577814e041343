"""Operator scale: N jobs × M workers against kmock's Kubernetes emulator, in one process.

Measures, for the real operator (Kopf handlers, daemons, API client):
  - time from creating N jobs to all N×M pods existing, and pods created per second;
  - the same creates issued by a bare aiohttp client (the emulator's limit), for comparison;
  - time for every job's status to reflect its pods after they all change phase (Pending → Running);
  - peak RSS of the process (operator + emulator + bench together: an upper bound for the operator).

    .venv/bin/python bench/operator_scale.py --jobs 100 --workers 16

The emulator is the bottleneck here; the aims in issue 4 (≥ 0.5× the bare-client rate, 1,600 pods in ≤ 4 s,
status converged ≤ 3 s after the last pod change, RSS ≤ 250 MiB) are for a real API server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from operator_support import (  # noqa: E402
    JOBS,
    MERGE,
    NS,
    PODS_URL,
    Cluster,
    declare_resources,
    fast_config,
    running_operator,
    spec_dict,
    write_kubeconfig,
)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pod_names(cluster: Cluster) -> set[str]:
    return {name for (res, ns, name), o in list(cluster.objects.items())
            if res.plural == "pods" and ns == NS and not o.deleted}


def statuses(cluster: Cluster) -> list[dict[str, Any]]:
    return [dict(o).get("status") or {} for (res, _, _), o in list(cluster.objects.items())
            if res.plural == "llmtrainingjobs" and not o.deleted]


async def wait(condition: Any, timeout: float) -> float:
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)
    return time.perf_counter() - start


async def bare_client(jobs: int, workers: int, concurrency: int) -> float:
    """pods/s of plain aiohttp POSTs against a fresh emulator."""
    import kmock

    async with Cluster() as cluster, kmock.Server(cluster):
        declare_resources(cluster)
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(base_url=str(cluster.url)) as http:
            async def create(name: str) -> None:
                body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                        "spec": {"containers": [{"name": "c", "image": "x"}]}}
                async with limit, http.post(PODS_URL, json=body) as resp:
                    assert resp.status in (200, 201)
            start = time.perf_counter()
            await asyncio.gather(*(create(f"j{j}-worker-{i}") for j in range(jobs) for i in range(workers)))
            return jobs * workers / (time.perf_counter() - start)


async def operator_run(jobs: int, workers: int) -> dict[str, Any]:
    import kmock

    async with Cluster() as cluster, kmock.Server(cluster):
        declare_resources(cluster)
        kubeconfig = Path(tempfile.mkdtemp()) / "kubeconfig"
        write_kubeconfig(kubeconfig, cluster.url)
        os.environ["KUBECONFIG"] = str(kubeconfig)
        config = fast_config()
        async with running_operator(config), aiohttp.ClientSession(
                base_url=str(cluster.url), connector=aiohttp.TCPConnector(force_close=True, limit=64)) as http:
            spec = spec_dict(workers={"nodes": workers}, training={"globalBatchSize": 16 * workers})
            start = time.perf_counter()
            await asyncio.gather(*(http.post(f"/apis/{JOBS.rsplit('/', 1)[0]}/namespaces/{NS}/llmtrainingjobs",
                                             json={"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                                                   "metadata": {"name": f"j{j}", "namespace": NS}, "spec": spec})
                                   for j in range(jobs)))
            await wait(lambda: len(pod_names(cluster)) >= jobs * workers, 600)
            created = time.perf_counter() - start
            names = sorted(pod_names(cluster))
            limit = asyncio.Semaphore(64)

            async def running(name: str) -> None:
                body = {"status": {"phase": "Running", "podIP": "127.0.0.1",
                                   "conditions": [{"type": "Ready", "status": "True"}]}}
                async with limit, http.patch(f"{PODS_URL}/{name}/status", json=body, headers=MERGE) as resp:
                    assert resp.status == 200
            await asyncio.gather(*(running(n) for n in names))
            last_change = time.perf_counter()
            try:
                await wait(lambda: all(s.get("workers", {}).get("ready") == workers for s in statuses(cluster))
                           and len(statuses(cluster)) == jobs, float(os.environ.get("BENCH_TIMEOUT", 60)))
                converged: float | None = time.perf_counter() - last_change
                stale = 0
            except TimeoutError:
                converged = None
                stale = sum(1 for s in statuses(cluster) if s.get("workers", {}).get("ready") != workers)
        return {"seconds_to_all_pods": created, "pods_per_second": jobs * workers / created,
                "status_converged_seconds": converged, "jobs_not_converged": stale}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    bare = await bare_client(args.jobs, args.workers, 64)
    result = await operator_run(args.jobs, args.workers)
    result.update({"bare_client_pods_per_second": bare, "ratio_to_bare": result["pods_per_second"] / bare,
                   "peak_rss_mib": rss_mib(), "jobs": args.jobs, "workers": args.workers, "cpus": os.cpu_count() or 0})
    print(f"{args.jobs} jobs × {args.workers} workers = {args.jobs * args.workers} pods (kmock emulator)")
    print(f"  bare aiohttp client:   {bare:8.0f} pods/s")
    print(f"  operator:              {result['pods_per_second']:8.0f} pods/s ({result['ratio_to_bare']:.2f}× bare), "
          f"all pods in {result['seconds_to_all_pods']:.2f} s")
    if result["status_converged_seconds"] is not None:
        print(f"  status converged:      {result['status_converged_seconds']:.2f} s after the last pod change")
    else:
        print(f"  status not converged after {os.environ.get('BENCH_TIMEOUT', 60)} s for "
              f"{result['jobs_not_converged']} jobs (the emulator is slow or lost a watch event, see docs)")
    print(f"  peak RSS (all in one): {result['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
