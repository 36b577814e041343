"""End to end: the real operator (Kopf handlers, daemons, API client) in-process against kmock's
Kubernetes emulator over HTTP. Pods do not run here: tests move them through phases as kubelet would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from operator_support import (
    JOBS,
    JOBS_URL,
    MERGE,
    NS,
    PODS_URL,
    Cluster,
    declare_resources,
    running_operator,
    spec_dict,
    wait_until,
    write_kubeconfig,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=Cluster)]


@pytest_asyncio.fixture(autouse=True)
async def cluster(kmock: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    declare_resources(kmock)
    write_kubeconfig(tmp_path / "kubeconfig", kmock.url)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # The tests' own requests (kubectl's part) go through a session of their own, one connection per
    # request: kept-alive connections to kmock stop being answered once an operator has been stopped
    # and started again in the same test.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base_url=str(kmock.url), connector=connector) as http:
        kmock.http = http
        yield kmock


def job(name: str = "job", **sections: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
            "metadata": {"name": name, "namespace": NS}, "spec": spec_dict(**sections)}


def obj(cluster: Cluster, resource: str, name: str) -> dict[str, Any] | None:
    plural = resource.rsplit("/", 1)[-1]
    for (res, ns, key), o in list(cluster.objects.items()):
        if res.plural == plural and ns == NS and key == name and not o.deleted:
            return plain(o)
    return None


def plain(o: Any) -> Any:
    """kmock's object views as plain dicts (all the way down)."""
    if hasattr(o, "items"):
        return {k: plain(v) for k, v in o.items()}
    if isinstance(o, list):
        return [plain(v) for v in o]
    return o


def pods(cluster: Cluster, job_name: str = "job") -> dict[str, dict[str, Any]]:
    out = {}
    for (resource, ns, name), o in list(cluster.objects.items()):
        if resource.plural == "pods" and ns == NS and not o.deleted and name.startswith(f"{job_name}-worker-"):
            out[name] = plain(o)
    return out


def status(cluster: Cluster, name: str = "job") -> dict[str, Any]:
    return (obj(cluster, JOBS, name) or {}).get("status") or {}


async def create(cluster: Cluster, manifest: dict[str, Any]) -> None:
    async with cluster.http.post(JOBS_URL, json=manifest) as resp:
        assert resp.status in (200, 201), await resp.text()


async def pod_phase(cluster: Cluster, name: str, phase: str, exit_code: int | None = None, message: str = "",
                    **status: Any) -> None:
    """What kubelet would write: the phase, the pod IP, readiness or the container's exit."""
    body: dict[str, Any] = {"status": {"phase": phase, "podIP": "127.0.0.1", **status}}
    if exit_code is not None:
        body["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message}}}]
    elif phase == "Running":
        body["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    async with cluster.http.patch(f"{PODS_URL}/{name}/status", json=body, headers=MERGE) as resp:
        assert resp.status == 200, await resp.text()


async def run_pods(cluster: Cluster, job_name: str = "job") -> None:
    for name in pods(cluster, job_name):
        await pod_phase(cluster, name, "Running")


async def patch_job(cluster: Cluster, spec: dict[str, Any], name: str = "job") -> None:
    async with cluster.http.patch(f"{JOBS_URL}/{name}", json={"spec": spec}, headers=MERGE) as resp:
        assert resp.status == 200, await resp.text()


def events(cluster: Cluster, job_name: str = "job") -> list[str]:
    out = []
    for (res, ns, _), o in list(cluster.objects.items()):
        if res.plural == "events" and ns == NS and not o.deleted:
            e = plain(o)
            if e.get("involvedObject", {}).get("name") == job_name:
                out.append(f"{e.get('reason')}: {e.get('message')}")
    return out


def uids(cluster: Cluster, job_name: str = "job") -> dict[str, str]:
    return {name: p["metadata"]["uid"] for name, p in pods(cluster, job_name).items()}


def phase_is(cluster: Cluster, phase: str, name: str = "job") -> Any:
    return lambda: status(cluster, name).get("phase") == phase


async def started(cluster: Cluster, manifest: dict[str, Any], running: bool = True) -> None:
    name = manifest["metadata"]["name"]
    nodes = manifest["spec"]["workers"]["nodes"]
    await create(cluster, manifest)
    await wait_until(lambda: len(pods(cluster, name)) == nodes, what=f"{nodes} pods")
    if running:
        await run_pods(cluster, name)
        await wait_until(phase_is(cluster, "Running", name), what="Running")


async def test_create_makes_service_configmap_and_pods(cluster: Cluster) -> None:
    async with running_operator() as memo:
        await create(cluster, job())
        await wait_until(lambda: len(pods(cluster)) == 2, what="2 pods")
        await wait_until(phase_is(cluster, "Pending"), what="Pending")
        manifest = obj(cluster, JOBS, "job")
        assert manifest is not None and manifest["metadata"]["finalizers"] == ["kubetrain.io/finalizer"]
        uid = manifest["metadata"]["uid"]
        svc, cm = obj(cluster, "v1/services", "job"), obj(cluster, "v1/configmaps", "job-config")
        assert svc is not None and svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        assert cm is not None and '"maxSteps": 100' in cm["data"]["config.json"]
        for i, p in enumerate(sorted(pods(cluster).values(), key=lambda p: p["metadata"]["name"])):
            assert p["metadata"]["labels"]["kubetrain.io/replica-index"] == str(i)
            assert p["metadata"]["ownerReferences"][0]["uid"] == uid
            assert (p["spec"]["hostname"], p["spec"]["subdomain"]) == (f"job-worker-{i}", "job")
            command = p["spec"]["containers"][0]["command"]
            assert f"--rdzv-endpoint=job-worker-0.job.{NS}.svc:29400" in command and f"--rdzv-id={uid}" in command
        await run_pods(cluster)
        await wait_until(phase_is(cluster, "Running"), what="Running")
        st = status(cluster)
        assert st["workers"] == {"desired": 2, "active": 2, "ready": 2, "failed": 0}
        assert st["conditions"][0]["type"] == "Running" and st["conditions"][0]["status"] == "True"
        assert st["observedGeneration"] == 1 and st["selector"] == "kubetrain.io/job-name=job"
        await wait_until(lambda: any(e.startswith("WorkersRunning") for e in events(cluster)), what="an event")
        assert "kubetrain_operator_pods_created_total 2.0" in memo.runtime.metrics.exposition().decode()
    # Status goes to the /status subresource as an explicit JSON merge patch of the whole object:
    # kubernetes_asyncio would otherwise send a dict as application/json-patch+json (a real API server: 400).
    status_patches = [r for r in cluster._requests if r.method == "PATCH" and r.url.path.endswith("/job/status")]
    assert status_patches
    for request in status_patches:
        assert request.headers["Content-Type"] == "application/merge-patch+json"
        assert set(json.loads(request.body)) == {"status"}


async def test_failed_worker_is_recreated_and_counted(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(runPolicy={"restartBackoffSeconds": 0}))
        before = uids(cluster)
        await pod_phase(cluster, "job-worker-1", "Failed", exit_code=137)
        await wait_until(lambda: status(cluster).get("restarts") == 1, what="a counted restart")
        await wait_until(lambda: uids(cluster).get("job-worker-1") not in (None, before["job-worker-1"]),
                         what="worker 1 recreated")
        assert uids(cluster)["job-worker-0"] == before["job-worker-0"]  # the survivor kept running
        await pod_phase(cluster, "job-worker-1", "Running")
        await wait_until(phase_is(cluster, "Running"), what="Running again")
        assert status(cluster)["restarts"] == 1
        await wait_until(lambda: any(e.startswith("WorkerSignal: job-worker-1 was killed by SIGKILL (exit 137); "
                                                  "restart 1 of 3") for e in events(cluster)), what="the event")


async def test_deleted_worker_rejoins_and_counts(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(runPolicy={"restartBackoffSeconds": 0}))
        before = uids(cluster)
        async with cluster.http.delete(f"{PODS_URL}/job-worker-1") as resp:  # kmock: gone at once (a force delete)
            assert resp.status == 200
        await wait_until(lambda: uids(cluster).get("job-worker-1") not in (None, before["job-worker-1"]),
                         what="worker 1 recreated")
        await wait_until(lambda: status(cluster).get("restarts") == 1, what="a counted restart")
        assert uids(cluster)["job-worker-0"] == before["job-worker-0"]


async def test_config_error_fails_at_once_without_retry(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job())
        await pod_phase(cluster, "job-worker-1", "Failed", exit_code=2,
                        message="spec.training.microBatchSize (3) must divide training.globalBatchSize (16)")
        await wait_until(phase_is(cluster, "Failed"), what="Failed")
        st = status(cluster)
        assert st["reason"] == "ConfigError" and "microBatchSize (3) must divide" in st["message"]
        assert st["restarts"] == 0 and "completionTime" in st
        assert {c["type"]: c["status"] for c in st["conditions"]}["Failed"] == "True"
        # cleanPodPolicy Running: the running worker goes, the failed one stays for its logs.
        await wait_until(lambda: set(pods(cluster)) == {"job-worker-1"}, what="running pods cleaned up")


async def test_worker0_success_succeeds_cleans_up_and_expires(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(runPolicy={"ttlSecondsAfterFinished": 1, "cleanPodPolicy": "Running"}))
        await pod_phase(cluster, "job-worker-0", "Succeeded", exit_code=0)
        await wait_until(phase_is(cluster, "Succeeded"), what="Succeeded")
        st = status(cluster)
        assert {c["type"]: c["status"] for c in st["conditions"]} == {"Running": "False", "Succeeded": "True"}
        assert st["reason"] == "Completed" and "completionTime" in st
        await wait_until(lambda: set(pods(cluster)) == {"job-worker-0"}, what="the running worker cleaned up")
        await wait_until(lambda: obj(cluster, JOBS, "job") is None, what="the job deleted after its TTL")


async def test_suspend_deletes_pods_and_resume_recreates_them(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job())
        await patch_job(cluster, {"runPolicy": {"suspend": True}})
        await wait_until(phase_is(cluster, "Suspended"), what="Suspended")
        await wait_until(lambda: not pods(cluster), what="pods deleted")
        await patch_job(cluster, {"runPolicy": {"suspend": False}})
        await wait_until(lambda: len(pods(cluster)) == 2, what="pods recreated")
        await run_pods(cluster)
        await wait_until(phase_is(cluster, "Running"), what="Running after resume")
        assert status(cluster)["restarts"] == 0
        assert any(e.startswith("Resumed") for e in events(cluster))


async def test_scale_subresource_adds_and_removes_workers(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3},
                                   training={"globalBatchSize": 12}))
        before = uids(cluster)
        async with cluster.http.patch(f"{JOBS_URL}/job/scale", json={"spec": {"replicas": 3}}, headers=MERGE) as resp:
            assert resp.status == 200
        await wait_until(lambda: len(pods(cluster)) == 3, what="a third worker")
        await wait_until(lambda: status(cluster).get("workers", {}).get("desired") == 3, what="desired 3")
        async with cluster.http.patch(f"{JOBS_URL}/job/scale", json={"spec": {"replicas": 1}}, headers=MERGE) as resp:
            assert resp.status == 200
        await wait_until(lambda: set(pods(cluster)) == {"job-worker-0"}, what="scaled down to 1")
        assert uids(cluster)["job-worker-0"] == before["job-worker-0"]  # scaling never restarts worker 0
        await wait_until(lambda: status(cluster).get("workers", {}).get("active") == 1, what="active 1")
        assert status(cluster)["restarts"] == 0
        assert any(e.startswith("Scaled: workers 3 → 1") for e in events(cluster))


async def test_deadline_fails_the_job_and_stops_workers(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(runPolicy={"activeDeadlineSeconds": 1, "cleanPodPolicy": "None"}))
        await wait_until(phase_is(cluster, "Failed"), what="Failed")
        assert status(cluster)["reason"] == "DeadlineExceeded"
        await wait_until(lambda: not pods(cluster), what="workers stopped despite cleanPodPolicy None")


@pytest.mark.parametrize(("spec", "expected"), [
    ({"workers": {"nodes": 2, "minNodes": 3, "maxNodes": 2}}, "spec.workers.minNodes (3) must not exceed"),
    ({"training": {"globalBatchSize": 16, "microBatchSize": 16}, "workers": {"nodes": 2}},
     "spec.training.microBatchSize (16) must divide the per-process batch"),
    ({"model": {"preset": "gpt-5"}}, "spec.model.preset: Input should be"),
])
async def test_invalid_spec_fails_without_pods(cluster: Cluster, spec: dict[str, Any], expected: str) -> None:
    async with running_operator():
        await create(cluster, job("bad", **spec))
        await wait_until(phase_is(cluster, "Failed", "bad"), what="Failed")
        st = status(cluster, "bad")
        assert st["reason"] == "InvalidSpec" and expected in st["message"]
        assert not pods(cluster, "bad")


async def test_garbage_does_not_stop_the_operator(cluster: Cluster) -> None:
    async with running_operator():
        garbage = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                   "metadata": {"name": "junk", "namespace": NS}, "spec": "not a mapping",
                   "status": {"phase": 7, "restarts": "many", "conditions": "none", "startTime": 5}}
        await create(cluster, garbage)
        await wait_until(phase_is(cluster, "Failed", "junk"), what="the junk job Failed")
        assert status(cluster, "junk")["reason"] == "InvalidSpec"
        await started(cluster, job("good"), running=False)  # and the next job is served as usual


async def test_restart_mid_creation_converges_without_duplicates(cluster: Cluster) -> None:
    cluster.fail_pods_after = 2  # the API server starts failing pod creations after two
    async with running_operator():
        await create(cluster, job(workers={"nodes": 4}))
        await wait_until(lambda: cluster.pods_seen >= 3, what="creations failing mid-way")
        assert len(pods(cluster)) == 2
    # The operator stopped between pod creations, before it wrote any status.
    assert not status(cluster).get("tracking", {}).get("launched")
    first, seen = set(pods(cluster)), len(cluster._requests)
    cluster.fail_pods_after = None
    async with running_operator():
        await wait_until(lambda: len(pods(cluster)) == 4, what="4 pods")
        await run_pods(cluster)
        await wait_until(phase_is(cluster, "Running"), what="Running")
        assert status(cluster)["restarts"] == 0 and status(cluster)["workers"]["active"] == 4
    posted = {r.data["metadata"]["name"] for r in cluster._requests[seen:]
              if r.method == "POST" and r.url.path == PODS_URL}
    assert posted == {f"job-worker-{i}" for i in range(4)} - first  # the pods that existed were adopted
    assert len(pods(cluster)) == 4


async def test_restart_keeps_counted_restarts(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(runPolicy={"restartBackoffSeconds": 30}))
        await pod_phase(cluster, "job-worker-1", "Failed", exit_code=1)
        await wait_until(lambda: status(cluster).get("restarts") == 1, what="a counted restart")
    async with running_operator():  # a new operator instance: nothing in memory
        await wait_until(lambda: status(cluster).get("phase") == "Restarting", what="Restarting")
        await asyncio.sleep(0.6)  # a few reconciles (resync 0.5 s) with the failure in view
        assert status(cluster)["restarts"] == 1
        assert status(cluster)["tracking"]["replacing"].keys() == {"1"}


async def test_deletion_stops_reconciling(cluster: Cluster) -> None:
    async with running_operator() as memo:
        await started(cluster, job())
        async with cluster.http.delete(f"{JOBS_URL}/job") as resp:
            assert resp.status == 200
        await wait_until(lambda: obj(cluster, JOBS, "job") is None, what="the finalizer released")
        await wait_until(lambda: not memo.runtime.wakeups, what="the job's loops stopped")
        # kmock has no garbage collector: do what it does for the pods' ownerReferences.
        for name in pods(cluster):
            async with cluster.http.delete(f"{PODS_URL}/{name}") as resp:
                assert resp.status == 200
        await asyncio.sleep(0.6)
        assert not pods(cluster)


async def test_scale_to_a_size_the_batch_does_not_fit_is_rejected(cluster: Cluster) -> None:
    async with running_operator():
        await started(cluster, job(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3}))  # 16 sequences
        async with cluster.http.patch(f"{JOBS_URL}/job/scale", json={"spec": {"replicas": 3}}, headers=MERGE) as resp:
            assert resp.status == 200
        await wait_until(lambda: any(e.startswith("ScaleRejected") for e in events(cluster)), what="ScaleRejected")
        assert status(cluster)["phase"] == "Running" and len(pods(cluster)) == 2
        assert status(cluster)["workers"]["desired"] == 2


async def test_progress_is_read_from_worker0_and_a_stall_restarts_workers(cluster: Cluster) -> None:
    progress: dict[str, Any] = {"step": 40, "maxSteps": 100, "loss": 3.5, "evalLoss": float("nan"),
                                "tokensPerSecond": 5000.0, "mfu": 0.41, "etaSeconds": 12.0, "phase": "training",
                                "checkpoint": {"step": 30, "uri": "/checkpoints/job/step-000000030",
                                               "time": 1_700_000_000.0}, "updatedAt": 1_700_000_000.5}

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(progress)  # the trainer's /progress on global rank 0

    app = web.Application()
    app.router.add_get("/progress", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_operator():
            await started(cluster, job(metrics={"port": port}, runPolicy={"stallTimeoutSeconds": 2,
                                                                          "restartBackoffSeconds": 0}))
            await wait_until(lambda: status(cluster).get("progress", {}).get("step") == 40, what="progress")
            st = status(cluster)
            assert st["progress"]["loss"] == 3.5 and st["progress"]["mfu"] == 0.41
            assert "evalLoss" not in st["progress"]  # NaN is not JSON Kubernetes accepts
            assert st["checkpoint"] == {"step": 30, "uri": "/checkpoints/job/step-000000030",
                                        "time": "2023-11-14T22:13:20Z"}
            before = uids(cluster)
            # The step stays at 40: after stallTimeoutSeconds the workers are restarted.
            await wait_until(lambda: status(cluster).get("restarts") == 1, what="a stall restart")
            stalled = "RestartingAllWorkers: no training step for 2s (stuck at step 40)"
            await wait_until(lambda: any(e.startswith(stalled) for e in events(cluster)), what="the stall event")
            await wait_until(lambda: len(pods(cluster)) == 2 and not set(uids(cluster).values()) & set(
                before.values()), what="workers relaunched")
    finally:
        await runner.cleanup()
