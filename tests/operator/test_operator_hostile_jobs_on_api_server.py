"""The real operator in-process against a real Kubernetes control plane (tests/cluster), the test playing the
node's kubelet (support.operator.PlayedKubelet), as in test_operator_on_api_server.py.

This file: one operator serves every namespace's jobs, so no job may take it down or use it. Hostile jobs in one
namespace (the most nodes the API server lets a job ask for, with a batch that splits over almost none of
those sizes; a /progress that redirects to another server; one that serves a gzip bomb) and, meanwhile, another
namespace's job is still reconciled at once; the hostile ones cost a bounded number of Events, the operator
follows no redirect and inflates nothing (bounds: kubetrain_api.manifest, validate.py, progress.fetch_progress)."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
from cluster.client import ApiError, Kube
from support import wait_for, wait_until
from support.http_server import serving
from support.operator import Jobs, PlayedKubelet, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("kubeconfig")]
HUGE = {"nodes": 1, "minNodes": 1, "maxNodes": 10_000}  # the most kubetrain_api.manifest.MAX_NODES allows
UNSPLITTABLE = {"globalBatchSize": 720720, "microBatchSize": 1}  # splits over 240 sizes of 1..10000


@pytest.fixture
def other_namespace(kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A second namespace, which running_operator(namespace) then serves too (as a cluster-wide operator serves
    them all): Kopf is started on both (`kubetrain operator -n A -n B`)."""
    import kopf

    name = f"{namespace}-b"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(lambda: kube.find(f"/api/v1/namespaces/{name}/serviceaccounts/default"), timeout=60,
             what=f"ServiceAccount {name}/default")
    spawn_tasks = kopf.spawn_tasks

    async def on_both(**kwargs: Any) -> Any:
        return await spawn_tasks(**{**kwargs, "namespaces": [namespace, name]})

    monkeypatch.setattr(kopf, "spawn_tasks", on_both)
    kubelet = PlayedKubelet(kube, name)
    yield name, kubelet
    kubelet.clear()
    kube.delete(f"/api/v1/namespaces/{name}")


async def test_hostile_jobs_neither_stall_the_operator_for_other_namespaces_nor_make_it_fetch_or_inflate(
        jobs: Jobs, kubelet: PlayedKubelet, kube: Kube, namespace: str, other_namespace: Any) -> None:
    from aiohttp import web

    other, other_kubelet = other_namespace
    with pytest.raises(ApiError) as refused:  # what took the operator past its memory limit before
        jobs.create(jobs.manifest("millions", workers={"maxNodes": 10**7, "nodes": 1}))
    assert refused.value.status == 422 and "spec.workers.maxNodes" in refused.value.message
    elsewhere: list[str] = []
    redirected: list[str] = []
    bombed: list[str] = []

    async def secret(_: web.Request) -> web.Response:
        return web.json_response({"step": 5})

    bomb = gzip.compress(b'{"step": 7, "pad": "' + b" " * (64 << 20) + b'"}')  # 64 KB inflating to 64 MB

    async def gzipped(_: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async with serving(secret, elsewhere) as target:
        async def redirect(_: web.Request) -> web.Response:
            raise web.HTTPFound(f"http://127.0.0.1:{target}/latest/meta-data/")

        async with serving(redirect, redirected) as redirect_port, serving(gzipped, bombed) as bomb_port, \
                other_kubelet.running(), running_operator(namespace):
            for name, port in (("redirect", redirect_port), ("bomb", bomb_port)):
                jobs.create(jobs.manifest(name, workers=HUGE, training=UNSPLITTABLE, metrics={"port": port}))
            for name in ("redirect", "bomb"):
                await wait_until(lambda n=name: len(kubelet.pods(n)) == 1, what=f"{name}'s worker")  # type: ignore[misc]
                await kubelet.run_all(name)
            # Meanwhile another namespace's job is reconciled: its pods are there within the bounded wait.
            good = Jobs(kube, other)
            good.create(good.manifest("good"))
            await wait_until(lambda: len(other_kubelet.pods("good")) == 2, timeout=10, what="the good job's pods")
            await wait_until(lambda: len(redirected) >= 3 and len(bombed) >= 3, what="/progress polled")
            for name in ("redirect", "bomb"):
                assert jobs.status(name)["phase"] == "Running"
                assert "progress" not in jobs.status(name), jobs.status(name)  # neither 5 (elsewhere) nor 7
                warnings = [e for e in jobs.events(name) if e.startswith("SpecWarning")]
                assert 1 <= len(warnings) <= 3 and all(len(w) < 2000 for w in warnings), len(warnings)
            assert elsewhere == []
