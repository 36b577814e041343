"""The planner and whose pods are whose (ownership.py), pods held by a finalizer, refused creates, and a
drained worker's grace period: pure, on plan() and support.operator.Sim."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kubetrain_api.manifest import API_VERSION, KIND
from kubetrain_operator.draft import CreateFailure
from kubetrain_operator.ownership import Owner, adoption_patch, object_ownership
from kubetrain_operator.planner import PlannerConfig, plan
from kubetrain_operator.render import JobRef
from support import spec_dict
from support.operator import Sim, job_view, pod

NOW = 1_000_000.0
CFG = PlannerConfig(held_pod_seconds=30)
LAUNCHED = {"phase": "Running", "startTime": "1970-01-12T13:00:00Z", "workers": {"desired": 2},
            "tracking": {"launched": 2}}


def test_an_earlier_jobs_pods_are_deleted_and_waited_for_never_taken_as_the_jobs_own() -> None:
    """`kubectl delete ltj job --cascade=orphan`, then the job applied again: the old pods (no controller, our
    labels) failed with exit 2; the new job must neither fail with that exit nor count them."""
    orphans = [pod(i, "Failed", exit_code=2, owner=None, uid=f"old-{i}") for i in (0, 1)]
    p = plan(job_view(spec_dict(workers={"nodes": 2})), {}, orphans, NOW, CFG)
    assert p.phase == "Pending" and not p.create
    assert {d.name for d in p.delete} == {"job-worker-0", "job-worker-1"}
    assert [e.reason for e in p.events if e.type == "Warning"] == ["StalePods"]
    # GC still pending: controlled by the old LLMTrainingJob of that name (another uid); terminating now
    pending = [pod(i, owner=Owner(API_VERSION, KIND, "job", "old-job"), uid=f"old-{i}", terminating=True)
               for i in (0, 1)]
    p = plan(job_view(spec_dict(workers={"nodes": 2})), {}, pending, NOW, CFG)
    assert not p.create and not [e for e in p.events if e.type == "Warning"] and not p.delete
    p = plan(job_view(spec_dict(workers={"nodes": 2})), {}, [], NOW, CFG)
    assert p.create == [0, 1] and p.launch and p.names == {}


def test_a_foreign_pod_of_a_workers_name_is_left_alone_and_the_worker_gets_another_name() -> None:
    mine = Owner("apps/v1", "ReplicaSet", "someone", "rs-1")
    foreign = pod(0, owner=mine, managed=False, uid="theirs")
    p = plan(job_view(spec_dict(workers={"nodes": 2})), {}, [foreign], NOW, CFG)
    assert p.create == [0, 1] and p.names == {0: "job-worker-0-1"} and not p.delete


def test_a_worker_held_by_a_finalizer_counts_as_gone_and_its_replacement_gets_another_name() -> None:
    """Worker 0 deleted (kubectl delete pod) while a finalizer is on it: its container ended, the object stays.
    The restart relaunches once it has been held for held_pod_seconds, worker 0 as job-worker-0-1."""
    status = {**LAUNCHED, "restarts": 1, "tracking": {"launched": 2, "fullRestart": True,
                                                      "replacing": {"0": "u0", "1": "u1"},
                                                      "restartTime": "1970-01-12T13:46:40Z"}}
    held = pod(0, "Failed", uid="u0", terminating=True, exit_code=143, finished_at=NOW - 5, deletion_time=NOW - 40)
    view = job_view(spec_dict(workers={"nodes": 2}, runPolicy={"restartBackoffSeconds": 0}))
    assert plan(view, status, [held], NOW, CFG).create == []  # 5 s: its kubelet may still remove it
    p = plan(view, status, [held], NOW + 30, CFG)
    assert p.create == [0, 1] and p.names == {0: "job-worker-0-1"} and not p.delete
    # Relaunched: the replacement is worker 0 from now on, the held pod is only a name taken
    new = [pod(0, uid="n0", ready=True), pod(1, uid="n1", ready=True)]
    new[0] = dataclasses.replace(new[0], name="job-worker-0-1")
    after = {**status, "phase": "Restarting", "tracking": {"launched": 2}}
    p = plan(view, after, [held, *new], NOW + 40, CFG)
    assert p.phase == "Running" and not p.create and not p.delete and p.restarts == []


def test_a_lost_nodes_worker_held_by_a_finalizer_counts_as_gone_once_its_grace_period_is_long_over() -> None:
    """Worker 0's node is gone: nobody ends its containers, so its phase stays Running (not ready), and a
    finalizer keeps the deleted pod. 30 s past its deadline (the force delete's, grace 0) it counts as gone."""
    status = {**LAUNCHED, "restarts": 1, "tracking": {"launched": 2, "fullRestart": True,
                                                      "replacing": {"0": "u0", "1": "u1"},
                                                      "restartTime": "1970-01-12T13:46:40Z"}}
    lost = pod(0, "Running", uid="u0", terminating=True, ready=False, deletion_time=NOW - 200,
               deletion_deadline=NOW - 5)
    view = job_view(spec_dict(workers={"nodes": 2}, runPolicy={"restartBackoffSeconds": 0}))
    assert plan(view, status, [lost], NOW, CFG).create == []
    p = plan(view, status, [lost], NOW + 30, CFG)
    assert p.create == [0, 1] and p.names == {0: "job-worker-0-1"}
    # A deleted worker still reported ready is its kubelet at work (a long grace period): never taken as held
    draining = dataclasses.replace(lost, ready=True)
    assert plan(view, status, [draining], NOW + 30, CFG).create == []


def test_a_conflict_holds_the_job_pending_with_one_event() -> None:
    view = dataclasses.replace(job_view(spec_dict()), conflict="ConfigMap default/job-config exists and is not "
                                                               "this job's")
    p = plan(view, {}, [], NOW, CFG)
    assert (p.phase, p.create) == ("Pending", [])
    assert p.status_patch["reason"] == "NameConflict" and "job-config" in p.status_patch["message"]
    status = {k: v for k, v in p.status_patch.items() if v is not None}
    again = plan(view, status, [], NOW + 1, CFG)
    assert not again.events and not again.create


def test_a_refused_create_backs_off_and_says_why(started: Callable[..., Sim]) -> None:
    view = job_view(spec_dict(workers={"nodes": 2}))
    failure = CreateFailure("pod job-worker-1: 403 Forbidden: exceeded quota: pods=1", NOW, attempts=3)
    refused = dataclasses.replace(view, create_failure=failure)
    p = plan(refused, {}, [pod(0, "Pending")], NOW + 1, CFG)
    assert not p.create and p.status_patch["reason"] == "CreateFailed"
    assert "exceeded quota" in p.status_patch["message"] and "3 time(s)" in p.status_patch["message"]
    assert p.requeue_after == 7  # 2 s doubling: the 4th try 8 s after the 3rd
    assert plan(refused, {}, [pod(0, "Pending")], NOW + 8, CFG).create == [1]


def test_a_drained_worker_keeps_its_grace_period_and_the_group_stops_with_it(started: Callable[..., Sim]) -> None:
    """`kubectl drain` with a long grace period: the drained worker writes the group's SIGTERM checkpoint, so
    the others get their own grace too, and it is not force-deleted while it is still ready (its kubelet at
    work), only once its own grace period is over: one restart, nothing cut short."""
    sim = started(workers={"nodes": 2}, runPolicy={"restartBackoffSeconds": 0})
    sim.graceful = True
    drained = dataclasses.replace(sim.pods[1], terminating=True, deletion_time=sim.now,
                                  deletion_deadline=sim.now + 600, ready=True)
    sim.pods[1] = drained
    p = sim.step(1)
    assert sim.restarts == 1 and {d.name: d.grace_seconds for d in p.delete} == {"job-worker-0": None}
    for _ in range(10):  # 550 s: long past the short grace and below_min_grace_seconds, within its own
        assert not sim.step(55).delete and sim.restarts == 1
    p = sim.step(600 + sim.cfg.below_min_grace_seconds - 550)
    assert {d.name for d in p.delete if d.force} >= {"job-worker-1"} and sim.restarts == 1


def test_ownership_by_controller_uid_never_by_name() -> None:
    job = JobRef("x", "ns", "uid-new")
    ours = {"metadata": {"name": "x-config", "ownerReferences": [
        {"apiVersion": API_VERSION, "kind": KIND, "name": "x", "uid": "uid-new", "controller": True}]}}
    old = {"metadata": {"name": "x-config", "uid": "cm-1",
                        "labels": {"kubetrain.io/job-name": "x", "app.kubernetes.io/managed-by": "kubetrain-operator"},
                        "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND, "name": "x", "uid": "uid-old",
                                             "controller": True}]}}
    somebodys = {"metadata": {"name": "x-config", "labels": {"kubetrain.io/job-name": "x"}}}
    assert [object_ownership(o, job) for o in (ours, old, somebodys)] == ["ours", "stale", "foreign"]
    assert adoption_patch(old, job) == {"metadata": {"uid": "cm-1", "ownerReferences": [
        {"apiVersion": API_VERSION, "kind": KIND, "name": "x", "uid": "uid-new", "controller": True,
         "blockOwnerDeletion": True}]}}
