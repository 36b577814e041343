"""The real operator (Kopf handlers, daemons, API client) in-process against a real Kubernetes
control plane (tests/cluster: kube-apiserver, etcd, controller manager, scheduler). The CRD is the generated
manifests/crd.yaml; the scheduler binds worker pods to a Node that the test keeps Ready, and the test plays
that node's kubelet (support.operator.PlayedKubelet): it writes pod status and finishes graceful deletions.

This file: a job's life: its objects and status (through /status, read back by the scale subresource),
success and clean-up and the TTL, suspend/resume, `kubectl scale`, the deadline, `kubectl delete` of the
job, and /progress into status with a stall restart. Failures and restarts:
test_operator_failures_on_api_server.py; invalid specs: test_operator_invalid_specs_on_api_server.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cluster.client import kubectl, ns_path
from support import wait_until
from support.operator import FINALIZER, Jobs, PlayedKubelet, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("kubeconfig")]
Launched = Callable[..., Awaitable[None]]  # tests/operator/conftest.py: launched


async def test_create_makes_service_configmap_and_pods(jobs: Jobs, kubelet: PlayedKubelet, namespace: str,
                                                       kubeconfig: Path, tmp_path: Path) -> None:
    ns = namespace
    async with running_operator(ns) as memo:
        # As a user would: kubectl apply of a YAML manifest (the server validates it against the CRD schema).
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(jobs.manifest()))
        await asyncio.to_thread(kubectl, kubeconfig, "apply", "-f", str(tmp_path / "job.yaml"))
        await wait_until(lambda: len(kubelet.pods()) == 2, what="2 pods")
        await wait_until(jobs.phase_is("Pending"), what="Pending")
        manifest = jobs.get()
        assert manifest is not None and manifest["metadata"]["finalizers"] == [FINALIZER]
        uid = manifest["metadata"]["uid"]
        svc = jobs.kube.get(ns_path(ns, "services", "job"))
        cm = jobs.kube.get(ns_path(ns, "configmaps", "job-config"))
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        assert '"maxSteps": 100' in cm["data"]["config.json"]
        for obj in (svc, cm):
            assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
        for i, p in enumerate(sorted(kubelet.pods().values(), key=lambda p: p["metadata"]["name"])):
            assert p["metadata"]["labels"]["kubetrain.io/replica-index"] == str(i)
            assert p["metadata"]["ownerReferences"][0]["uid"] == uid
            assert (p["spec"]["hostname"], p["spec"]["subdomain"]) == (f"job-worker-{i}", "job")
            command = p["spec"]["containers"][0]["command"]
            assert f"--rdzv-endpoint=job-worker-0.job.{ns}.svc:29400" in command and f"--rdzv-id={uid}" in command
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running")
        st = jobs.status()
        assert st["workers"] == {"desired": 2, "active": 2, "ready": 2, "failed": 0}
        assert st["conditions"][0]["type"] == "Running" and st["conditions"][0]["status"] == "True"
        assert st["observedGeneration"] == 1 and st["selector"] == "kubetrain.io/job-name=job"
        # Status went through /status: the spec's generation did not move.
        assert jobs.get()["metadata"]["generation"] == 1  # type: ignore[index]
        await wait_until(jobs.has_event("WorkersRunning"), what="an event")
        assert "kubetrain_operator_pods_created_total 2.0" in memo.runtime.metrics.exposition().decode()
        # The scale subresource reads back the operator's status (statusReplicasPath, labelSelectorPath).
        scale = jobs.kube.get(jobs.path("job") + "/scale")
        assert scale["spec"]["replicas"] == 2
        assert scale["status"] == {"replicas": 2, "selector": "kubetrain.io/job-name=job"}


async def test_worker0_success_succeeds_cleans_up_and_expires(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                              namespace: str, llmtrainingjob_gc: None) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest(runPolicy={"ttlSecondsAfterFinished": 2,
                                                              "cleanPodPolicy": "Running"}))
        kubelet.exit("job-worker-0", 0)
        await wait_until(jobs.phase_is("Succeeded"), what="Succeeded")
        st = jobs.status()
        assert {c["type"]: c["status"] for c in st["conditions"]} == {"Running": "False", "Succeeded": "True"}
        assert st["reason"] == "Completed" and "completionTime" in st
        await wait_until(lambda: set(kubelet.pods()) == {"job-worker-0"}, what="the running worker cleaned up")
        await wait_until(lambda: jobs.get() is None, what="the job deleted after its TTL")
        # The garbage collector deletes what the job owned.
        await wait_until(lambda: not kubelet.pods() and jobs.kube.find(ns_path(namespace, "services", "job")) is None,
                         what="the job's pods and Service collected")


async def test_suspend_deletes_pods_and_resume_recreates_them(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                              namespace: str) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest())
        jobs.patch_spec({"runPolicy": {"suspend": True}})
        await wait_until(jobs.phase_is("Suspended"), what="Suspended")
        await wait_until(lambda: not kubelet.pods(), what="pods deleted")
        assert sorted(kubelet.finished) == ["job-worker-0", "job-worker-1"]  # graceful: each stopped first
        jobs.patch_spec({"runPolicy": {"suspend": False}})
        await wait_until(lambda: len(kubelet.pods()) == 2, what="pods recreated")
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running after resume")
        assert jobs.status()["restarts"] == 0
        assert jobs.status()["observedGeneration"] == 3  # two spec changes, each a new generation
        assert any(e.startswith("Resumed") for e in jobs.events())


async def test_kubectl_scale_reforms_the_group_at_the_new_size(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                             namespace: str, kubeconfig: Path) -> None:
    """A scale stops every worker gracefully (their SIGTERM checkpoint) and relaunches the group at the new size
    once all are gone: not a restart."""
    async def scale(replicas: int, check: bool = True) -> Any:
        return await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "scale", "llmtrainingjob/job",
                                       f"--replicas={replicas}", check=check)

    async with running_operator(namespace):
        await launched(jobs.manifest(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3},
                                                   training={"globalBatchSize": 12}))
        before = kubelet.uids()
        await scale(3)
        assert jobs.get()["spec"]["workers"]["nodes"] == 3  # type: ignore[index]  # specReplicasPath
        await wait_until(lambda: len(kubelet.pods()) == 3, what="three workers")
        assert sorted(kubelet.finished) == ["job-worker-0", "job-worker-1"]  # each stopped gracefully first
        assert not set(kubelet.uids().values()) & set(before.values())
        await wait_until(lambda: jobs.status().get("workers", {}).get("desired") == 3, what="desired 3")
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running at 3")
        three = kubelet.uids()
        await scale(1)
        await wait_until(lambda: set(kubelet.pods()) == {"job-worker-0"} and kubelet.uids()["job-worker-0"] !=
                         three["job-worker-0"], what="re-formed at 1")
        await kubelet.run_all()
        await wait_until(lambda: jobs.status().get("workers", {}).get("active") == 1, what="active 1")
        await wait_until(jobs.phase_is("Running"), what="Running at 1")
        assert jobs.status()["restarts"] == 0
        assert any(e.startswith("Scaled: workers 3 → 1: checkpointing the current step") for e in jobs.events())
        # Outside minNodes..maxNodes the API server refuses the scale (the CRD's CEL rule), not the operator.
        refused = await scale(4, check=False)
        assert refused.returncode != 0 and "workers.nodes must not exceed workers.maxNodes" in refused.stderr
        assert jobs.get()["spec"]["workers"]["nodes"] == 1  # type: ignore[index]


async def test_scale_to_a_size_the_batch_does_not_fit_is_rejected(jobs: Jobs, kubelet: PlayedKubelet,
                                                                  launched: Launched, namespace: str) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3}))  # 16 seqs
        jobs.scale(3)  # within maxNodes: the server accepts it; 16 sequences do not split over 3 workers
        await wait_until(jobs.has_event("ScaleRejected"), what="ScaleRejected")
        assert jobs.status()["phase"] == "Running" and len(kubelet.pods()) == 2
        assert jobs.status()["workers"]["desired"] == 2


async def test_deadline_fails_the_job_and_stops_workers(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                        namespace: str) -> None:
    async with running_operator(namespace):
        # (Its workers never start: the deadline counts from the job's start, not theirs.)
        await launched(jobs.manifest(runPolicy={"activeDeadlineSeconds": 1, "cleanPodPolicy": "None"}),
                      running=False)
        await wait_until(jobs.phase_is("Failed"), what="Failed")
        assert jobs.status()["reason"] == "DeadlineExceeded"
        await wait_until(lambda: not kubelet.pods(), what="workers stopped despite cleanPodPolicy None")


async def test_deletion_stops_reconciling(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched, namespace: str,
                                          kubeconfig: Path, llmtrainingjob_gc: None) -> None:
    async with running_operator(namespace) as memo:
        await launched(jobs.manifest())
        await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "llmtrainingjob", "job", "--wait=false")
        await wait_until(lambda: jobs.get() is None, what="the finalizer released")
        await wait_until(lambda: not memo.runtime.wakeups, what="the job's loops stopped")
        # The garbage collector deletes the pods (ownerReferences); they terminate gracefully.
        await wait_until(lambda: not kubelet.pods(), what="the pods collected")
        assert sorted(kubelet.finished) == ["job-worker-0", "job-worker-1"]
        await asyncio.sleep(0.6)
        assert not kubelet.pods()


async def test_progress_is_read_from_worker0_and_a_stall_restarts_workers(jobs: Jobs, kubelet: PlayedKubelet,
                                                                          launched: Launched, namespace: str) -> None:
    progress: dict[str, Any] = {"step": 40, "maxSteps": 100, "loss": 3.5, "evalLoss": float("nan"),
                                "tokensPerSecond": 5000.0, "mfu": 0.41, "etaSeconds": 12.0, "phase": "training",
                                "checkpoint": {"step": 30, "uri": "/checkpoints/job/step-000000030",
                                               "time": 1_700_000_000.0}, "updatedAt": 1_700_000_000.5}

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(progress)  # the trainer's /progress on global rank 0, at the pod IP

    app = web.Application()
    app.router.add_get("/progress", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_operator(namespace):
            spec: dict[str, Any] = {"metrics": {"port": port},
                                    "runPolicy": {"stallTimeoutSeconds": 2, "restartBackoffSeconds": 0}}
            await launched(jobs.manifest(**spec))
            await wait_until(lambda: jobs.status().get("progress", {}).get("step") == 40, what="progress")
            st = jobs.status()
            assert st["progress"]["loss"] == 3.5 and st["progress"]["mfu"] == 0.41
            assert "evalLoss" not in st["progress"]  # NaN is not JSON Kubernetes accepts
            assert st["checkpoint"] == {"step": 30, "uri": "/checkpoints/job/step-000000030",
                                        "time": "2023-11-14T22:13:20Z"}
            before = kubelet.uids()
            # The step stays at 40: after stallTimeoutSeconds the workers are restarted.
            await wait_until(lambda: jobs.status().get("restarts") == 1, what="a stall restart")
            stalled = "RestartingAllWorkers: no training step for 2s (stuck at step 40)"
            await wait_until(jobs.has_event(stalled), what="the stall event")
            await wait_until(lambda: len(kubelet.pods()) == 2 and not set(kubelet.uids().values()) & set(
                before.values()), what="workers relaunched")
    finally:
        await runner.cleanup()
