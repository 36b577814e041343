"""The real operator in-process against a real API server (as test_operator_on_api_server.py): whose objects
are whose. A job applied again after `kubectl delete --cascade=orphan` trains as a new job; a foreign
ConfigMap of the job's config name is never touched; a worker held by a finalizer does not block the restart;
an exit 2 whose pod is gone before a reconcile (the pod event handler saw it) still fails the job; a pod
deleted while the watch did not see it (a stale index) is noticed by the audit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cluster.client import kubectl, ns_path
from kubetrain_operator.controller import Reconciler, Runtime
from kubetrain_operator.pods import observe_pod
from support import wait_until
from support.operator import Jobs, PlayedKubelet, fast_config, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("kubeconfig")]
Launched = Callable[..., Awaitable[None]]


def controller_uid(obj: dict) -> str | None:  # type: ignore[type-arg]
    return next((r["uid"] for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")), None)


async def test_a_job_applied_again_after_an_orphaning_delete_trains_as_a_new_job(
        jobs: Jobs, kubelet: PlayedKubelet, launched: Launched, namespace: str, kubeconfig: Path) -> None:
    async with running_operator(namespace):
        await launched(jobs.manifest())
        kubelet.exit("job-worker-0", 2, message="tokenizer.path: the trainer needs a prepared tokenizer")
        await wait_until(jobs.phase_is("Failed"), what="the first job Failed")
        old = kubelet.uids()
        await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "llmtrainingjob", "job",
                                "--cascade=orphan", "--wait=false")
        await wait_until(lambda: jobs.get() is None, timeout=60,
                         what=f"the job gone ({(jobs.get() or {}).get('metadata', {}).get('finalizers')})")
        await wait_until(lambda: all(controller_uid(p) is None for p in kubelet.pods().values()),
                         what="its pods orphaned by the garbage collector")
        new_uid = jobs.create(jobs.manifest())["metadata"]["uid"]
        await wait_until(lambda: len(kubelet.pods()) == 2 and not set(kubelet.uids().values()) & set(old.values()),
                         what="new pods in place of the old")
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), what="the new job Running")
        assert jobs.status()["restarts"] == 0
        assert {controller_uid(p) for p in kubelet.pods().values()} == {new_uid}
        config = jobs.kube.get(ns_path(namespace, "configmaps", "job-config"))
        assert controller_uid(config) == new_uid  # adopted, not left to the old owner
        await wait_until(jobs.has_event("StalePods: job-worker-0: left by an earlier job"),
                         what="the event")


async def test_a_foreign_configmap_of_the_jobs_config_name_is_left_untouched(
        jobs: Jobs, kubelet: PlayedKubelet, namespace: str) -> None:
    jobs.kube.create(ns_path(namespace, "configmaps"), {"apiVersion": "v1", "kind": "ConfigMap",
                                                        "metadata": {"name": "job-config"}, "data": {"team": "a"}})
    async with running_operator(namespace):
        jobs.create(jobs.manifest())
        await wait_until(lambda: jobs.status().get("reason") == "NameConflict", what="the conflict reported")
        assert "ConfigMap" in jobs.status()["message"] and "job-config" in jobs.status()["message"]
        config = jobs.kube.get(ns_path(namespace, "configmaps", "job-config"))
        assert config["data"] == {"team": "a"} and not config["metadata"].get("ownerReferences")
        assert kubelet.pods() == {}


async def test_a_worker_held_by_a_finalizer_does_not_block_the_restart(
        jobs: Jobs, kubelet: PlayedKubelet, launched: Launched, namespace: str, kubeconfig: Path) -> None:
    path = ns_path(namespace, "pods", "job-worker-0")
    async with running_operator(namespace):
        await launched(jobs.manifest(runPolicy={"restartBackoffSeconds": 0}))
        jobs.kube.patch(path, {"metadata": {"finalizers": ["example.com/hold"]}})
        try:
            await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "pod", "job-worker-0",
                                    "--wait=false")
            await wait_until(lambda: "job-worker-0-1" in kubelet.pods() and "job-worker-1" in kubelet.pods()
                             and not kubelet.pods()["job-worker-1"]["metadata"].get("deletionTimestamp"),
                             timeout=30, what="the group relaunched, worker 0 under another name")
            await kubelet.run_all()
            await wait_until(jobs.phase_is("Running"), what="Running again")
            assert jobs.status()["restarts"] == 1
            pod0 = kubelet.pods()["job-worker-0-1"]
            assert pod0["spec"]["hostname"] == "job-worker-0"  # the rendezvous address stays
            assert kubelet.pods()["job-worker-0"]["status"]["phase"] == "Failed"  # still held
        finally:
            jobs.kube.patch(path, {"metadata": {"finalizers": None}})


async def test_an_exit_2_fails_the_job_even_when_its_pod_is_gone_before_a_reconcile(
        jobs: Jobs, kubelet: PlayedKubelet, launched: Launched, namespace: str) -> None:
    """Worker 1's exit 2 reached the pod event handler, then its pod was removed (the operator's own delete of a
    group being restarted: a pod that has ended goes at once) before any reconcile saw it in the index. The job
    fails with that exit, and spends no restart."""
    async with running_operator(namespace):
        await launched(jobs.manifest())
    kubelet.exit("job-worker-1", 2, message="model.config.vocab_size: too small")
    ended = observe_pod(kubelet.pods()["job-worker-1"])
    jobs.kube.delete(ns_path(namespace, "pods", "job-worker-1"), {"gracePeriodSeconds": 0})
    await wait_until(lambda: "job-worker-1" not in kubelet.pods(), what="the pod gone")
    indexed = [observe_pod(p) for p in kubelet.pods().values()]  # worker 0 only
    rt = await Runtime.start(fast_config())
    try:
        key = (namespace, "job")
        rt.wakeups[key] = asyncio.Event()  # (the job's reconcile loop is there)
        rt.keep_report(namespace, "job", ended)  # what the pod event handler does with each pod event
        await Reconciler(rt, jobs.get(), {key: indexed}, logging.getLogger("test")).once()
        status = jobs.status()
        assert (status["phase"], status["reason"], status["restarts"]) == ("Failed", "ConfigError", 0)
        assert "vocab_size: too small" in status["message"]
    finally:
        await rt.close()


async def test_a_pod_gone_without_the_index_seeing_it_is_noticed_by_the_audit(
        jobs: Jobs, kubelet: PlayedKubelet, launched: Launched, namespace: str) -> None:
    """A watch gap: the index (Kopf's, here a dict) still holds a pod the API server no longer has. The audit's
    list finds it gone, and the job restarts for it instead of waiting on it forever."""
    async with running_operator(namespace):
        await launched(jobs.manifest(workers={"nodes": 1}))
    indexed = [observe_pod(p) for p in kubelet.pods().values()]
    jobs.kube.delete(ns_path(namespace, "pods", "job-worker-0"), {"gracePeriodSeconds": 0})
    await wait_until(lambda: kubelet.pods() == {}, what="the pod gone")
    rt = await Runtime.start(fast_config())
    try:
        reconciler = Reconciler(rt, jobs.get(), {(namespace, "job"): indexed}, logging.getLogger("test"))
        reconciler.audited_at -= rt.config.audit_seconds
        await reconciler.once()
        assert jobs.status()["restarts"] == 1 and reconciler.ghosts == {indexed[0].uid}  # type: ignore[union-attr]
    finally:
        await rt.close()
