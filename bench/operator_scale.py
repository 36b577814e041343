"""Operator scale: N jobs × M workers against any Kubernetes API server (a kubeconfig), or kmock's emulator.

Measures, for the real operator (`kubetrain operator`, its own process, default settings):
  - time from creating N LLMTrainingJobs to all N×M worker pods created, and pods created per second;
  - the same number of pod creates issued by a bare aiohttp client at the same concurrency (the limit);
  - time for every job's status.workers.ready to reach M after the bench turns all pods Running and Ready
    (it plays kubelet: the pods are unschedulable by a nodeSelector, so nothing else touches them);
  - the operator process's peak RSS (sampled every 50 ms).

    .venv/bin/python bench/operator_scale.py --jobs 100 --workers 16                     # kmock, in process
    .venv/bin/python bench/operator_scale.py --kubeconfig ~/.kube/config --jobs 100 --workers 16

With --kubeconfig the CRD must be installed (`kubectl apply -f manifests/crd.yaml`) and the identity needs
the operator's RBAC plus pod create/delete/patch-status in --namespace (created if missing, and everything
in it that the bench created is deleted at the end). Issue 4's aims (≥ 0.5× the bare client's rate, 1,600
pods in ≤ 4 s, status converged ≤ 3 s after the last pod change, RSS ≤ 250 MiB) are for a real API server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MERGE = {"Content-Type": "application/merge-patch+json"}
JOB_LABEL = "kubetrain.io/job-name"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[Path]:
    """kmock's Kubernetes emulator in this process (with what operator_support adds); yields a kubeconfig."""
    import kmock
    from operator_support import Cluster, declare_resources, write_kubeconfig

    async with Cluster() as cluster, kmock.Server(cluster):
        declare_resources(cluster)
        path = Path(tempfile.mkdtemp()) / "kubeconfig"
        write_kubeconfig(path, cluster.url)
        yield path


@contextlib.asynccontextmanager
async def session(kubeconfig: Path, concurrency: int) -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session with the kubeconfig's server, credentials and CA."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    headers = {}
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    if token:
        headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
    context: ssl.SSLContext | bool = False
    if str(cfg.host).startswith("https"):
        tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if not cfg.verify_ssl:
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        if cfg.cert_file:
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        context = tls
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
    async with aiohttp.ClientSession(base_url=cfg.host, headers=headers, connector=connector) as http:
        yield http


async def check(resp: aiohttp.ClientResponse, *ok: int) -> Any:
    if resp.status not in ok:
        raise RuntimeError(f"{resp.method} {resp.url}: {resp.status} {(await resp.text())[:300]}")
    return await resp.json() if resp.content_type == "application/json" else None


def pods_url(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods"


def jobs_url(ns: str) -> str:
    return f"/apis/kubetrain.io/v1alpha1/namespaces/{ns}/llmtrainingjobs"


async def ensure_namespace(http: aiohttp.ClientSession, ns: str) -> None:
    async with http.get(f"/api/v1/namespaces/{ns}") as resp:
        if resp.status == 200:
            return
    async with http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": ns}}) as resp:
        await check(resp, 200, 201, 409)


async def gather_limited(limit: int, coros: list[Any]) -> None:
    gate = asyncio.Semaphore(limit)

    async def run(coro: Any) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(run(c) for c in coros))


async def bare_client(http: aiohttp.ClientSession, ns: str, count: int, concurrency: int) -> float:
    """pods/s of plain POSTs of the same number of (unschedulable) pods; they are deleted afterwards."""
    async def create(name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns,
                                                                "labels": {"kubetrain.io/bench": "bare"}},
                "spec": {"containers": [{"name": "c", "image": "kubetrain/none"}],
                         "nodeSelector": {"kubetrain.io/bench": "no-such-node"}}}
        async with http.post(pods_url(ns), json=body) as resp:
            await check(resp, 200, 201)

    names = [f"bare-{i}" for i in range(count)]
    start = time.perf_counter()
    await gather_limited(concurrency, [create(n) for n in names])
    rate = count / (time.perf_counter() - start)
    await gather_limited(concurrency, [_delete(http, f"{pods_url(ns)}/{n}") for n in names])
    return rate


async def _delete(http: aiohttp.ClientSession, url: str) -> None:
    async with http.delete(url, params={"gracePeriodSeconds": "0"}) as resp:
        await check(resp, 200, 202, 404)


def operator_metric(port: int, name: str) -> float | None:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


class Operator:
    """`kubetrain operator` in its own process; its RSS sampled in a thread-free way by the caller."""

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

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def poll(op: Operator, condition: Any, timeout: float, every: float = 0.05) -> float:
    """Seconds until `condition()` (sync or async) holds, sampling the operator's RSS meanwhile."""
    start = time.perf_counter()
    while True:
        op.sample()
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError
        await asyncio.sleep(every)


async def operator_run(http: aiohttp.ClientSession, kubeconfig: Path, ns: str, jobs: int, workers: int,
                       concurrency: int, timeout: float, log: Path) -> dict[str, Any]:
    from operator_support import spec_dict

    op = Operator(kubeconfig, ns, log)
    loop = asyncio.get_running_loop()

    def metric(name: str) -> Any:
        return loop.run_in_executor(None, operator_metric, op.port, name)

    try:
        await poll(op, lambda: metric("kubetrain_operator_leader"), 60)  # serving: Kopf is starting
        await asyncio.sleep(1.0)  # let Kopf's watches start before the jobs arrive
        spec = spec_dict(workers={"nodes": workers, "podTemplate": {"nodeSelector": {
            "kubetrain.io/bench": "no-such-node"}}}, training={"globalBatchSize": 16 * workers})

        async def create_job(j: int) -> None:
            body = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                    "metadata": {"name": f"bench-{j}", "namespace": ns}, "spec": spec}
            async with http.post(jobs_url(ns), json=body) as resp:
                await check(resp, 200, 201)

        start = time.perf_counter()
        await gather_limited(concurrency, [create_job(j) for j in range(jobs)])

        async def all_created() -> bool:
            return (await metric("kubetrain_operator_pods_created_total") or 0) >= jobs * workers

        try:
            await poll(op, all_created, timeout)
        except TimeoutError:  # report how far it got instead of nothing
            made = await metric("kubetrain_operator_pods_created_total") or 0
            return {"seconds_to_all_pods": None, "pods_per_second": made / (time.perf_counter() - start),
                    "pods_listed": int(made), "duplicate_pods": 0, "status_converged_seconds": None,
                    "operator_peak_rss_mib": op.peak_rss / 2**20, "timed_out": True}
        created = time.perf_counter() - start
        async with http.get(pods_url(ns), params={"labelSelector": JOB_LABEL}) as resp:
            items = (await check(resp, 200))["items"]
        names = [p["metadata"]["name"] for p in items if p["metadata"]["name"].startswith("bench-")]
        duplicates = len(names) - len(set(names))

        async def running(name: str) -> None:
            body = {"status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
            async with http.patch(f"{pods_url(ns)}/{name}/status", json=body, headers=MERGE) as resp:
                await check(resp, 200)

        await gather_limited(concurrency, [running(n) for n in names])
        last_change = time.perf_counter()

        async def converged() -> bool:
            async with http.get(jobs_url(ns)) as resp:
                found = [j for j in (await check(resp, 200))["items"] if j["metadata"]["name"].startswith("bench-")]
            return len(found) == jobs and all((j.get("status") or {}).get("workers", {}).get("ready") == workers
                                              for j in found)

        try:
            await poll(op, converged, timeout, every=0.1)
            status_seconds: float | None = time.perf_counter() - last_change
        except TimeoutError:
            status_seconds = None
        return {"seconds_to_all_pods": created, "pods_per_second": jobs * workers / created,
                "pods_listed": len(names), "duplicate_pods": duplicates, "status_converged_seconds": status_seconds,
                "operator_peak_rss_mib": op.peak_rss / 2**20}
    finally:
        op.stop()
        await gather_limited(concurrency, [_delete(http, f"{jobs_url(ns)}/bench-{j}") for j in range(jobs)])


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    target = "kmock emulator (in this process)"
    log = Path(tempfile.mkdtemp()) / "operator.log"
    if args.kubeconfig:
        target = f"kubeconfig {args.kubeconfig}"
        kube = Path(args.kubeconfig).expanduser()
        async with session(kube, args.concurrency) as http:
            await ensure_namespace(http, args.namespace)
            bare = await bare_client(http, args.namespace, args.jobs * args.workers, args.concurrency)
            result = await operator_run(http, kube, args.namespace, args.jobs, args.workers, args.concurrency,
                                        args.timeout, log)
    else:
        # kmock scans every stored object on every request, so each contender gets a fresh emulator.
        async with emulator() as kube, session(kube, args.concurrency) as http:
            bare = await bare_client(http, args.namespace, args.jobs * args.workers, args.concurrency)
        async with emulator() as kube, session(kube, args.concurrency) as http:
            result = await operator_run(http, kube, args.namespace, args.jobs, args.workers, args.concurrency,
                                        args.timeout, log)
    result.update(target=target, jobs=args.jobs, workers=args.workers, bare_client_pods_per_second=bare,
                  timeout=args.timeout,
                  ratio_to_bare=result["pods_per_second"] / bare, operator_log=str(log))
    return result


def report(r: dict[str, Any]) -> str:
    pods = r["jobs"] * r["workers"]
    lines = [f"{r['jobs']} jobs × {r['workers']} workers = {pods} pods; {r['target']}",
             f"  bare aiohttp client   {r['bare_client_pods_per_second']:8.0f} pods/s",
             f"  operator              {r['pods_per_second']:8.0f} pods/s = {r['ratio_to_bare']:.2f}× bare "
             f"(aim ≥ 0.5×); " + (f"all {pods} in {r['seconds_to_all_pods']:.2f} s (aim ≤ 4 s for 1,600)"
                                  if r["seconds_to_all_pods"] is not None else
                                  f"only {r['pods_listed']} created within the {r['timeout']:.0f} s timeout"),
             f"  pods listed           {r['pods_listed']} ({r['duplicate_pods']} duplicates)"]
    if r["status_converged_seconds"] is None:
        lines.append("  status                not converged within the timeout")
    else:
        lines.append(f"  status converged      {r['status_converged_seconds']:.2f} s after the last pod change "
                     "(aim ≤ 3 s)")
    lines.append(f"  operator peak RSS     {r['operator_peak_rss_mib']:.0f} MiB (aim ≤ 250 MiB)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", help="a real cluster's kubeconfig (default: kmock's emulator in process)")
    parser.add_argument("--namespace", default="kubetrain-bench")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (both contenders)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(measure(args))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
