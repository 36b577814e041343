"""The real operator (Kopf handlers, daemons, API client) in-process against a real Kubernetes
control plane (tests/cluster: kube-apiserver, etcd, controller manager, scheduler). The CRD is the generated
manifests/crd.yaml; the scheduler binds worker pods to a Node that the test keeps Ready, and the test plays
that node's kubelet (support.operator.PlayedKubelet): it writes pod status and finishes graceful deletions.

This file: failures and restarts: a failed, a deleted, a force-deleted worker (each one counted restart,
the whole group relaunched), a worker stuck terminating on a lost node, an exit restarting cannot help, and
the operator itself restarting (mid-creation of the pods; with restarts counted)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cluster.client import kubectl, ns_path
from support import wait_until
from support.operator import Jobs, PlayedKubelet, fast_config, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("kubeconfig")]
Launched = Callable[..., Awaitable[None]]  # tests/operator/conftest.py: launched


def relaunched(kubelet: PlayedKubelet, before: dict[str, str]) -> Callable[[], bool]:
    """Every worker of `before` exists again, as a new pod."""
    return lambda: (kubelet.uids().keys() == before.keys()
                    and not set(kubelet.uids().values()) & set(before.values()))


async def test_failed_worker_restarts_the_group_once(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                      namespace: str) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        kubelet.stuck.add("job-worker-0")  # to see how the survivor is stopped
        kubelet.exit("job-worker-1", 137)
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        survivor = await wait_until(lambda: (p := kubelet.pods().get("job-worker-0")) and
                                    p["metadata"].get("deletionTimestamp") and p, what="the survivor stopped")
        assert survivor["metadata"]["deletionGracePeriodSeconds"] == 1  # fast_config's failed_group_grace_seconds
        kubelet.exit("job-worker-0", 1)  # its collective failed as rank 1 went: part of the same restart
        kubelet.stuck.clear()
        await wait_until(relaunched(kubelet, before), what="both workers relaunched")
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1
        await wait_until(jobs.has_event("WorkerSignal: job-worker-1 was killed by SIGKILL (exit 137); restart 1 of 3, "
                                        "all workers in 0s"), what="the event")


async def test_deleted_worker_is_replaced_once_it_is_gone(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                          namespace: str, kubeconfig: Path) -> None:
    """`kubectl delete pod` is graceful on a real server: the pod stays Terminating until its kubelet has
    stopped it. The operator counts it at once, and relaunches the group only once it is gone."""
    async with running_operator(namespace):
        await launched(jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        kubelet.stuck.add("job-worker-1")  # the kubelet takes its time
        await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "pod", "job-worker-1", "--wait=false")
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        await wait_until(jobs.has_event("WorkerDeleted: job-worker-1 is being deleted"), what="the event")
        pod = kubelet.pods()["job-worker-1"]
        assert pod["metadata"]["uid"] == before["job-worker-1"] and pod["metadata"]["deletionTimestamp"]
        await wait_until(lambda: "job-worker-0" not in kubelet.pods(), what="the survivor stopped")
        assert "job-worker-0" not in kubelet.pods()  # nothing relaunched while worker 1 is still there
        kubelet.stuck.clear()  # the container stopped: the kubelet deletes the pod
        await wait_until(relaunched(kubelet, before), what="both workers relaunched")
        assert "job-worker-1" in kubelet.finished
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1


async def test_force_deleted_worker_is_counted_once_and_recreated(jobs: Jobs, kubelet: PlayedKubelet,
                                                                  launched: Launched, namespace: str) -> None:
    """`kubectl delete --force --grace-period=0`: the server writes the deletionTimestamp, then removes the pod
    in the same request, so a watch may show it Terminating (WorkerDeleted) or only gone (WorkerLost). Either
    way it is one restart."""
    async with running_operator(namespace):
        await launched(jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        jobs.kube.delete(kubelet.path("job-worker-1"), {"gracePeriodSeconds": 0})
        await wait_until(relaunched(kubelet, before), what="both workers relaunched")
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        assert "job-worker-1" not in kubelet.finished  # gone at once: no kubelet had to stop it
        seen = ("WorkerLost: job-worker-1 disappeared", "WorkerDeleted: job-worker-1 is being deleted")
        await wait_until(lambda: any(e.startswith(seen) for e in jobs.events()), what="the event")
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1


async def test_worker_stuck_terminating_is_force_deleted_for_the_relaunch(jobs: Jobs, kubelet: PlayedKubelet,
                                                                          launched: Launched, namespace: str) -> None:
    """A worker on a lost node: deleted, but Terminating for good (no kubelet finishes it). Past the failed
    group's grace and the planner's grace (1 s each here), the operator force-deletes it and relaunches."""
    async with running_operator(namespace):
        await launched(jobs.manifest(workers={"nodes": 2, "minNodes": 2},
                                     runPolicy={"restartBackoffSeconds": 0}))
        before = kubelet.uids()
        kubelet.stuck.add("job-worker-1")
        jobs.kube.delete(kubelet.path("job-worker-1"), {"gracePeriodSeconds": 1})
        await wait_until(jobs.has_event("ForceDeleted: workers still terminating"), what="a force deletion")
        await wait_until(relaunched(kubelet, before), what="both workers relaunched")
        assert "job-worker-1" not in kubelet.finished  # the operator's force delete removed it, not the kubelet
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="Running again")
        assert jobs.status()["restarts"] == 1  # the deletion; the relaunch is part of it


async def test_config_error_fails_at_once_without_retry(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                                        namespace: str) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest())
        kubelet.exit("job-worker-1", 2,
                     message="spec.training.microBatchSize (3) must divide training.globalBatchSize (16)")
        await wait_until(jobs.phase_is("Failed"), what="Failed")
        st = jobs.status()
        assert st["reason"] == "ConfigError" and "microBatchSize (3) must divide" in st["message"]
        assert st["restarts"] == 0 and "completionTime" in st
        assert {c["type"]: c["status"] for c in st["conditions"]}["Failed"] == "True"
        # cleanPodPolicy Running: the running worker goes, the failed one stays for its logs.
        await wait_until(lambda: set(kubelet.pods()) == {"job-worker-1"}, what="running pods cleaned up")


async def test_config_error_after_another_workers_exit_still_fails_the_job(jobs: Jobs, kubelet: PlayedKubelet,
                                                                          launched: Launched, namespace: str) -> None:
    """Worker 0's collective fails first (exit 1, a restart of all), then worker 1 reports its configuration
    error: the job fails, no second restart, nothing relaunched. (A long planner grace: worker 1, stuck
    terminating, must not be force-deleted before it reports.)"""
    async with running_operator(namespace, fast_config(below_min_grace_seconds=60.0)):
        await launched(jobs.manifest(runPolicy={"restartBackoffSeconds": 5}))
        kubelet.stuck.add("job-worker-1")
        kubelet.exit("job-worker-0", 1)
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
        # Its container ends after the operator's SIGTERM (a pod already Failed when the delete arrives is removed
        # at once by the API server, before anyone reads its exit code)
        await wait_until(lambda: kubelet.pods()["job-worker-1"]["metadata"].get("deletionTimestamp"),
                         what="worker 1 stopped")
        kubelet.exit("job-worker-1", 2, message="tokenizer.path: the trainer needs a prepared tokenizer")
        await wait_until(jobs.phase_is("Failed"), what="Failed")
        st = jobs.status()
        assert st["reason"] == "ConfigError" and "prepared tokenizer" in st["message"] and st["restarts"] == 1


async def test_a_refused_create_is_reported_and_a_restart_mid_creation_converges(
        jobs: Jobs, kubelet: PlayedKubelet, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetrain_operator.kube import Kube as OperatorKube

    # A ResourceQuota of two pods: the API server refuses the third and fourth creation (403).
    quota = ns_path(namespace, "resourcequotas", "two-pods")
    jobs.kube.create(ns_path(namespace, "resourcequotas"), {"apiVersion": "v1", "kind": "ResourceQuota",
                                                            "metadata": {"name": "two-pods"},
                                                            "spec": {"hard": {"pods": "2"}}})
    await wait_until(lambda: jobs.kube.get(quota).get("status", {}).get("hard"), what="the quota's status")
    async with running_operator(namespace) as memo:
        jobs.create(jobs.manifest(workers={"nodes": 4}))
        # The refusal is in status, tried again with a backoff (not every pass), and one Warning says so.
        await wait_until(lambda: jobs.status().get("reason") == "CreateFailed", what="the refusal in status")
        assert "exceeded quota: two-pods" in jobs.status()["message"] and jobs.status()["phase"] == "Pending"
        await wait_until(lambda: "3 time(s)" in jobs.status()["message"], what="the third try")
        assert sum(e.startswith("CreateFailed: ") for e in jobs.events()) == 1
        assert not memo.runtime.metrics.registry.get_sample_value("kubetrain_operator_errors_total",
                                                                  {"kind": "reconcile"})
        assert len(kubelet.pods()) == 2
    # The operator stopped between pod creations: the status records no launch.
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


async def test_restart_keeps_counted_restarts(jobs: Jobs, kubelet: PlayedKubelet, launched: Launched,
                                              namespace: str) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest(runPolicy={"restartBackoffSeconds": 30}))
        kubelet.exit("job-worker-1", 1)
        await wait_until(lambda: jobs.status().get("restarts") == 1, what="a counted restart")
    async with running_operator(namespace):  # a new operator instance: nothing in memory
        await wait_until(jobs.phase_is("Restarting"), what="Restarting")
        await asyncio.sleep(0.6)  # a few reconciles (resync 0.5 s) with the failure in view
        assert jobs.status()["restarts"] == 1
        assert jobs.status()["tracking"]["replacing"].keys() == {"0", "1"}  # the whole group is restarting
