"""End to end: the real operator (Kopf handlers, daemons, API client) in-process against a real Kubernetes
control plane (tests/cluster: kube-apiserver, etcd, controller manager, scheduler). The CRD is the generated
manifests/crd.yaml; the scheduler binds worker pods to a Node that the test keeps Ready, and the test plays
that node's kubelet (operator_support.PlayedKubelet): it writes pod status and finishes graceful deletions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from cluster.client import ApiError, Kube, kubectl, ns_path
from support import wait_until
from support.operator import FINALIZER, Jobs, PlayedKubelet, running_operator

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def kubeconfig(control_plane: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The operator in this process finds the cluster as `kubetrain operator` does outside one."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return Path(control_plane.kubeconfig)


@pytest_asyncio.fixture
async def kubelet(played_kubelet: PlayedKubelet) -> AsyncIterator[PlayedKubelet]:
    async with played_kubelet.running():
        yield played_kubelet


@pytest.fixture
def jobs(kube: Kube, namespace: str, llmtrainingjob_crd: str) -> Jobs:
    return Jobs(kube, namespace)


async def started(jobs: Jobs, kubelet: PlayedKubelet, manifest: dict[str, Any], running: bool = True) -> None:
    name = manifest["metadata"]["name"]
    nodes = manifest["spec"]["workers"]["nodes"]
    jobs.create(manifest)
    await wait_until(lambda: len(kubelet.pods(name)) == nodes, what=f"{nodes} pods")
    if running:
        await kubelet.run_all(name)
        await wait_until(jobs.phase_is("Running", name), what="Running")


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


async def test_failed_worker_is_recreated_and_counted(jobs: Jobs, kubelet: PlayedKubelet, namespace: str) -> None:
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        kubelet.exit("job-worker-1", 137)
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        await wait_until(lambda: kubelet.uids().get("job-worker-1") not in (None, before["job-worker-1"]),
                         what="worker 1 recreated")
        assert kubelet.uids()["job-worker-0"] == before["job-worker-0"]  # the survivor kept running
        await kubelet.run("job-worker-1")
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1
        await wait_until(jobs.has_event("WorkerSignal: job-worker-1 was killed by SIGKILL (exit 137); restart 1 of 3"),
                         what="the event")


async def test_deleted_worker_is_replaced_once_it_is_gone(jobs: Jobs, kubelet: PlayedKubelet, namespace: str,
                                                          kubeconfig: Path) -> None:
    """`kubectl delete pod` is graceful on a real server: the pod stays Terminating until its kubelet has
    stopped it. The operator counts it at once, and recreates it only once it is gone."""
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        kubelet.stuck.add("job-worker-1")  # the kubelet takes its time
        await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "pod", "job-worker-1", "--wait=false")
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        await wait_until(jobs.has_event("WorkerDeleted: job-worker-1 is being deleted"), what="the event")
        pod = kubelet.pods()["job-worker-1"]
        assert pod["metadata"]["uid"] == before["job-worker-1"] and pod["metadata"]["deletionTimestamp"]
        kubelet.stuck.clear()  # the container stopped: the kubelet deletes the pod
        await wait_until(lambda: kubelet.uids().get("job-worker-1") not in (None, before["job-worker-1"]),
                         what="worker 1 recreated")
        assert "job-worker-1" in kubelet.finished
        assert kubelet.uids()["job-worker-0"] == before["job-worker-0"]
        await kubelet.run("job-worker-1")
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1


async def test_force_deleted_worker_is_counted_once_and_recreated(jobs: Jobs, kubelet: PlayedKubelet,
                                                                  namespace: str) -> None:
    """`kubectl delete --force --grace-period=0`: the server writes the deletionTimestamp, then removes the pod
    in the same request, so a watch may show it Terminating (WorkerDeleted) or only gone (WorkerLost). Either
    way it is one restart."""
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        jobs.kube.delete(kubelet.path("job-worker-1"), {"gracePeriodSeconds": 0})
        await wait_until(lambda: kubelet.uids().get("job-worker-1") not in (None, before["job-worker-1"]),
                         what="worker 1 recreated")
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        assert kubelet.uids()["job-worker-0"] == before["job-worker-0"]
        assert "job-worker-1" not in kubelet.finished  # gone at once: no kubelet had to stop it
        seen = ("WorkerLost: job-worker-1 disappeared", "WorkerDeleted: job-worker-1 is being deleted")
        await wait_until(lambda: any(e.startswith(seen) for e in jobs.events()), what="the event")
        await kubelet.run("job-worker-1")
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1


async def test_worker_stuck_terminating_is_force_deleted_below_min_nodes(jobs: Jobs, kubelet: PlayedKubelet,
                                                                         namespace: str) -> None:
    """A worker on a lost node: deleted, but Terminating for good (no kubelet finishes it). Below minNodes
    for longer than the grace period (1 s here), the operator restarts all workers and force-deletes it."""
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(workers={"nodes": 2, "minNodes": 2},
                                                   runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        kubelet.stuck.add("job-worker-1")
        jobs.kube.delete(kubelet.path("job-worker-1"))
        await wait_until(jobs.has_event("RestartingAllWorkers: only 1 of minimum 2 workers alive for 1s"),
                         what="a restart of all workers")
        await wait_until(lambda: len(kubelet.pods()) == 2 and not set(kubelet.uids().values()) & set(before.values()),
                         what="both workers relaunched")
        assert "job-worker-1" not in kubelet.finished  # the operator's force delete removed it, not the kubelet
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 2  # the deletion, then the restart of all below minNodes


async def test_config_error_fails_at_once_without_retry(jobs: Jobs, kubelet: PlayedKubelet, namespace: str) -> None:
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest())
        kubelet.exit("job-worker-1", 2,
                     message="spec.training.microBatchSize (3) must divide training.globalBatchSize (16)")
        await wait_until(jobs.phase_is("Failed"), what="Failed")
        st = jobs.status()
        assert st["reason"] == "ConfigError" and "microBatchSize (3) must divide" in st["message"]
        assert st["restarts"] == 0 and "completionTime" in st
        assert {c["type"]: c["status"] for c in st["conditions"]}["Failed"] == "True"
        # cleanPodPolicy Running: the running worker goes, the failed one stays for its logs.
        await wait_until(lambda: set(kubelet.pods()) == {"job-worker-1"}, what="running pods cleaned up")


async def test_worker0_success_succeeds_cleans_up_and_expires(jobs: Jobs, kubelet: PlayedKubelet, namespace: str,
                                                              llmtrainingjob_gc: None) -> None:
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(runPolicy={"ttlSecondsAfterFinished": 2,
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


async def test_suspend_deletes_pods_and_resume_recreates_them(jobs: Jobs, kubelet: PlayedKubelet,
                                                              namespace: str) -> None:
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest())
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


async def test_kubectl_scale_adds_and_removes_workers(jobs: Jobs, kubelet: PlayedKubelet, namespace: str,
                                                      kubeconfig: Path) -> None:
    async def scale(replicas: int, check: bool = True) -> Any:
        return await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "scale", "llmtrainingjob/job",
                                       f"--replicas={replicas}", check=check)

    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3},
                                                   training={"globalBatchSize": 12}))
        before = kubelet.uids()
        await scale(3)
        assert jobs.get()["spec"]["workers"]["nodes"] == 3  # type: ignore[index]  # specReplicasPath
        await wait_until(lambda: len(kubelet.pods()) == 3, what="a third worker")
        await wait_until(lambda: jobs.status().get("workers", {}).get("desired") == 3, what="desired 3")
        await scale(1)
        await wait_until(lambda: set(kubelet.pods()) == {"job-worker-0"}, what="scaled down to 1")
        assert kubelet.uids()["job-worker-0"] == before["job-worker-0"]  # scaling never restarts worker 0
        await wait_until(lambda: jobs.status().get("workers", {}).get("active") == 1, what="active 1")
        assert jobs.status()["restarts"] == 0
        assert any(e.startswith("Scaled: workers 3 → 1") for e in jobs.events())
        # Outside minNodes..maxNodes the API server refuses the scale (the CRD's CEL rule), not the operator.
        refused = await scale(4, check=False)
        assert refused.returncode != 0 and "workers.nodes must not exceed workers.maxNodes" in refused.stderr
        assert jobs.get()["spec"]["workers"]["nodes"] == 1  # type: ignore[index]


async def test_scale_to_a_size_the_batch_does_not_fit_is_rejected(jobs: Jobs, kubelet: PlayedKubelet,
                                                                  namespace: str) -> None:
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3}))  # 16 seqs
        jobs.scale(3)  # within maxNodes: the server accepts it; 16 sequences do not split over 3 workers
        await wait_until(jobs.has_event("ScaleRejected"), what="ScaleRejected")
        assert jobs.status()["phase"] == "Running" and len(kubelet.pods()) == 2
        assert jobs.status()["workers"]["desired"] == 2


async def test_deadline_fails_the_job_and_stops_workers(jobs: Jobs, kubelet: PlayedKubelet, namespace: str) -> None:
    async with running_operator(namespace):
        # (Its workers never start: the deadline counts from the job's start, not theirs.)
        await started(jobs, kubelet, jobs.manifest(runPolicy={"activeDeadlineSeconds": 1, "cleanPodPolicy": "None"}),
                      running=False)
        await wait_until(jobs.phase_is("Failed"), what="Failed")
        assert jobs.status()["reason"] == "DeadlineExceeded"
        await wait_until(lambda: not kubelet.pods(), what="workers stopped despite cleanPodPolicy None")


# What the CRD's schema and CEL rules cannot express, the operator checks: such a job is accepted by the API
# server and failed by the operator, naming the field. (What the schema can express: the next test.)
OPERATOR_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "batch": ({"training": {"globalBatchSize": 16, "microBatchSize": 16}, "workers": {"nodes": 2}},
              "spec.training.microBatchSize (16) must divide the per-process batch"),
    "template": ({"workers": {"podTemplate": {"containers": [{"name": "sidecar"}]}}},
                 "spec.workers.podTemplate.containers: not supported"),
    "9lives": ({}, "metadata.name ('9lives') must start with a letter"),
}


async def test_invalid_specs_fail_without_pods_and_the_next_job_runs(jobs: Jobs, kubelet: PlayedKubelet,
                                                                      namespace: str) -> None:
    async with running_operator(namespace):
        for name, (spec, _) in OPERATOR_REJECTS.items():
            jobs.create(jobs.manifest(name, **spec))
        for name, (_, expected) in OPERATOR_REJECTS.items():
            await wait_until(jobs.phase_is("Failed", name), what=f"{name} Failed")
            st = jobs.status(name)
            assert st["reason"] == "InvalidSpec" and expected in st["message"], st
            assert not kubelet.pods(name)
        await started(jobs, kubelet, jobs.manifest("good"), running=False)  # and the next job is served


# The API server itself refuses these at create or apply time (the CRD's structural schema, its
# x-kubernetes-validations, strict field validation): the operator never sees them.
SERVER_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "below-min": ({"workers": {"nodes": 2, "minNodes": 3, "maxNodes": 4}},
                  "spec.workers: Invalid value: workers.nodes must not be below workers.minNodes"),
    "above-max": ({"workers": {"nodes": 4, "maxNodes": 3}}, "workers.nodes must not exceed workers.maxNodes"),
    "preset": ({"model": {"preset": "gpt-5"}}, "spec.model.preset: Unsupported value: \"gpt-5\""),
    "type": ({"training": {"maxSteps": "many"}}, "spec.training.maxSteps: Invalid value: \"string\""),
    "minimum": ({"workers": {"nodes": 0}}, "spec.workers.nodes: Invalid value: 0"),
}


@pytest.mark.parametrize("case", list(SERVER_REJECTS))
async def test_the_api_server_rejects_what_the_crd_schema_forbids(jobs: Jobs, case: str) -> None:
    spec, expected = SERVER_REJECTS[case]
    with pytest.raises(ApiError) as err:
        jobs.create(jobs.manifest(case, **spec))
    assert err.value.status == 422 and expected in err.value.message, err.value.message
    assert jobs.get(case) is None


async def test_kubectl_apply_rejects_a_malformed_manifest(jobs: Jobs, kubeconfig: Path, tmp_path: Path) -> None:
    not_a_mapping = {**jobs.manifest("junk"), "spec": "not a mapping"}
    typo = jobs.manifest("typo")
    typo["spec"]["training"]["maxStep"] = typo["spec"]["training"].pop("maxSteps")
    no_spec = {k: v for k, v in jobs.manifest("bare").items() if k != "spec"}
    for manifest, expected in ((not_a_mapping, "spec: Invalid value: \"string\""),
                               (typo, "unknown field \"spec.training.maxStep\""),
                               (no_spec, "spec: Required value")):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
        result = await asyncio.to_thread(kubectl, kubeconfig, "apply", "-f", str(tmp_path / "job.yaml"), check=False)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert jobs.get(manifest["metadata"]["name"]) is None


async def test_restart_mid_creation_converges_without_duplicates(jobs: Jobs, kubelet: PlayedKubelet, namespace: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetrain_operator.kube import Kube as OperatorKube

    # A ResourceQuota of two pods: the API server refuses the third and fourth creation (403).
    quota = ns_path(namespace, "resourcequotas", "two-pods")
    jobs.kube.create(ns_path(namespace, "resourcequotas"), {"apiVersion": "v1", "kind": "ResourceQuota",
                                                            "metadata": {"name": "two-pods"},
                                                            "spec": {"hard": {"pods": "2"}}})
    await wait_until(lambda: jobs.kube.get(quota).get("status", {}).get("hard"), what="the quota's status")
    async with running_operator(namespace) as memo:
        jobs.create(jobs.manifest(workers={"nodes": 4}))
        errors = memo.runtime.metrics.registry
        await wait_until(lambda: errors.get_sample_value("kubetrain_operator_errors_total", {"kind": "reconcile"}),
                         what="a reconcile failing on the quota")
        assert len(kubelet.pods()) == 2
    # The operator stopped between pod creations, before it wrote any status.
    assert not jobs.status().get("tracking", {}).get("launched")
    first = kubelet.uids()
    jobs.kube.delete(quota)
    posted: list[str] = []
    create = OperatorKube.create

    async def recording(self: OperatorKube, obj: dict[str, Any]) -> Any:
        if obj["kind"] == "Pod":
            posted.append(obj["metadata"]["name"])
        return await create(self, obj)

    monkeypatch.setattr(OperatorKube, "create", recording)
    async with running_operator(namespace):
        await wait_until(lambda: len(kubelet.pods()) == 4, what="4 pods")
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running")
        assert jobs.status()["restarts"] == 0 and jobs.status()["workers"]["active"] == 4
    assert set(posted) == {f"job-worker-{i}" for i in range(4)} - set(first)  # the pods that existed were adopted
    assert {n: u for n, u in kubelet.uids().items() if n in first} == first


async def test_restart_keeps_counted_restarts(jobs: Jobs, kubelet: PlayedKubelet, namespace: str) -> None:
    async with running_operator(namespace):
        await started(jobs, kubelet, jobs.manifest(runPolicy={"restartBackoffSeconds": 30}))
        kubelet.exit("job-worker-1", 1)
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
    async with running_operator(namespace):  # a new operator instance: nothing in memory
        await wait_until(jobs.phase_is("Restarting"), what="Restarting")
        await asyncio.sleep(0.6)  # a few reconciles (resync 0.5 s) with the failure in view
        assert jobs.status()["restarts"] == 1
        assert jobs.status()["tracking"]["replacing"].keys() == {"1"}


async def test_deletion_stops_reconciling(jobs: Jobs, kubelet: PlayedKubelet, namespace: str, kubeconfig: Path,
                                          llmtrainingjob_gc: None) -> None:
    async with running_operator(namespace) as memo:
        await started(jobs, kubelet, jobs.manifest())
        await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "llmtrainingjob", "job", "--wait=false")
        await wait_until(lambda: jobs.get() is None, what="the finalizer released")
        await wait_until(lambda: not memo.runtime.wakeups, what="the job's loops stopped")
        # The garbage collector deletes the pods (ownerReferences); they terminate gracefully.
        await wait_until(lambda: not kubelet.pods(), what="the pods collected")
        assert sorted(kubelet.finished) == ["job-worker-0", "job-worker-1"]
        await asyncio.sleep(0.6)
        assert not kubelet.pods()


async def test_progress_is_read_from_worker0_and_a_stall_restarts_workers(jobs: Jobs, kubelet: PlayedKubelet,
                                                                          namespace: str) -> None:
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
            await started(jobs, kubelet, jobs.manifest(**spec))
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

