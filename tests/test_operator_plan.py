"""The reconcile planner, a pure function: (job, status, observed pods, now) → actions and status."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetrain_api.status import JobStatus
from kubetrain_operator.bookkeeping import apply_merge_patch, merge_patch, update_conditions
from kubetrain_operator.planner import PlannerConfig, plan
from kubetrain_operator.pods import ObservedPod
from kubetrain_operator.policies.restart import backoff_seconds
from support import spec_dict
from support.operator import Sim, failed, job_view, pod

NOW = 1_000_000.0


def started(**sections: Any) -> Sim:
    """A job whose workers were created and are all running."""
    sim = Sim(spec_dict(**sections))
    sim.step()
    sim.run_all()
    sim.step(1)
    assert sim.phase == "Running"
    return sim


def test_a_new_job_creates_every_worker_and_is_pending() -> None:
    sim = Sim(spec_dict(checkpoint={"uri": None}, workers={"nodes": 3}, training={"globalBatchSize": 12}))
    p = sim.step()
    assert p.create == [0, 1, 2] and p.launch and not p.delete
    assert sim.phase == "Pending" and sim.status["tracking"]["launched"] == 3
    assert sim.status["startTime"] and sim.status["workers"]["desired"] == 3
    assert any("checkpoint.uri is not set" in e for e in sim.events("SpecWarning"))


def test_running_when_min_nodes_run() -> None:
    sim = Sim(spec_dict(workers={"nodes": 3, "minNodes": 2, "maxNodes": 3}, training={"globalBatchSize": 12}))
    sim.step()
    sim.set(0, "Running")
    sim.step(1)
    assert sim.phase == "Pending"
    sim.set(1, "Running", ready=True)
    sim.step(1)
    assert sim.phase == "Running" and sim.status["message"] == "2/3 workers running"
    assert sim.status["workers"] == {"desired": 3, "active": 3, "ready": 1, "failed": 0}
    assert sim.status["conditions"] == [{"type": "Running", "status": "True", "reason": "WorkersRunning",
                                         "message": "2/3 workers running",
                                         "lastTransitionTime": sim.status["conditions"][0]["lastTransitionTime"]}]


def test_a_failed_worker_is_replaced_after_backoff_and_counted_once() -> None:
    sim = started()
    survivor = sim.pods[0].uid
    sim.set(1, "Failed", exit_code=1, container_reason="Error")
    p = sim.step(1)
    assert sim.restarts == 1 and [d.name for d in p.delete] == ["job-worker-1"] and not p.create
    assert p.restarts == ["Error"] and p.requeue_after == 10
    assert sim.events("WorkerError") == ["WorkerError: job-worker-1 exited 1; restart 1 of 3, recreating it in 10s"]
    assert sim.step(0).restarts == [] and sim.restarts == 1  # the same failure is never counted twice
    assert sim.step(5).create == []  # backing off
    assert sim.step(5).create == [1]
    assert sim.pods[0].uid == survivor and sim.restarts == 1
    sim.run_all()
    sim.step(1)
    assert sim.phase == "Running" and sim.status["tracking"]["replacing"] == {}


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(10, n, 600) for n in (1, 2, 3, 7, 8)] == [10, 20, 40, 600, 600]
    assert backoff_seconds(0, 5, 600) == 0


def test_worker0_failure_restarts_all_workers_once() -> None:
    sim = started(workers={"nodes": 3}, training={"globalBatchSize": 12})
    sim.graceful = True
    sim.set(0, "Failed", exit_code=137, container_reason="OOMKilled")
    p = sim.step(1)
    assert sorted(d.name for d in p.delete) == ["job-worker-0", "job-worker-1", "job-worker-2"]
    assert sim.restarts == 1 and sim.phase == "Restarting" and sim.status["tracking"]["fullRestart"]
    # The survivors now fail too (the rendezvous host is gone): already part of this restart.
    sim.set(1, "Failed", exit_code=1)
    assert sim.step(1).restarts == [] and sim.restarts == 1
    for i in list(sim.pods):
        sim.gone(i)
    assert sim.step(1).create == []  # backoff 10 s from the failure
    p = sim.step(10)
    assert p.create == [0, 1, 2] and p.launch and sim.restarts == 1


@pytest.mark.parametrize(("code", "reason"), [(2, "ConfigError"), (3, "NonFiniteLoss")])
def test_deterministic_failures_fail_the_job_without_restarts(code: int, reason: str) -> None:
    sim = started(workers={"nodes": 3}, training={"globalBatchSize": 12})
    sim.set(2, "Failed", exit_code=code, termination_message="spec.training.seed: bad")
    p = sim.step(1)
    assert sim.phase == "Failed" and sim.status["reason"] == reason and sim.restarts == 0
    assert "spec.training.seed: bad" in sim.status["message"] and not p.create
    assert sorted(d.name for d in p.delete) == ["job-worker-0", "job-worker-1"]  # cleanPodPolicy Running
    assert sim.step(100).create == [] and sim.phase == "Failed"  # terminal stays terminal


def test_restarts_beyond_max_restarts_fail_the_job() -> None:
    sim = started(runPolicy={"maxRestarts": 1, "restartBackoffSeconds": 0})
    sim.set(1, "Failed", exit_code=1)
    sim.step(1)
    sim.step(1)
    sim.run_all()
    sim.set(1, "Failed", exit_code=1)
    sim.step(1)
    assert sim.phase == "Failed" and sim.status["reason"] == "MaxRestartsExceeded"
    assert "runPolicy.maxRestarts: 1" in sim.status["message"] and sim.restarts == 1


def test_worker0_success_succeeds_cleans_up_per_policy_and_expires() -> None:
    for policy, left in (("Running", {0, 1}), ("All", set()), ("None", {0, 1, 2})):
        sim = started(workers={"nodes": 3}, training={"globalBatchSize": 12},
                      runPolicy={"cleanPodPolicy": policy, "ttlSecondsAfterFinished": 60})
        sim.set(0, "Succeeded", exit_code=0)
        sim.set(1, "Succeeded", exit_code=0)
        p = sim.step(1)
        assert sim.phase == "Succeeded" and sim.status["completionTime"] and set(sim.pods) == left, policy
        assert p.requeue_after == 60 and not p.delete_job
        assert sim.step(60).delete_job


def test_deadline_fails_and_stops_workers_even_with_clean_pod_policy_none() -> None:
    sim = started(runPolicy={"activeDeadlineSeconds": 100, "cleanPodPolicy": "None"})
    assert sim.plans[-1].requeue_after is not None and sim.plans[-1].requeue_after <= 100
    sim.step(100)
    assert sim.phase == "Failed" and sim.status["reason"] == "DeadlineExceeded" and not sim.pods


def test_suspend_stops_workers_and_resume_waits_for_them_then_relaunches() -> None:
    sim = started(runPolicy={"activeDeadlineSeconds": 1000})
    sim.graceful = True
    sim.spec["runPolicy"]["suspend"] = True
    p = sim.step(1)
    assert len(p.delete) == 2 and sim.phase == "Suspended" and sim.restarts == 0
    sim.step(5000)  # a suspended job does not run into its deadline
    sim.spec["runPolicy"]["suspend"] = False
    assert sim.step(1).create == []  # the old workers are still checkpointing
    sim.gone(0)
    sim.gone(1)
    p = sim.step(1)
    assert p.create == [0, 1] and p.launch and sim.restarts == 0
    assert sim.events("Resumed") and sim.phase == "Pending"


def test_scale_up_and_down_never_restart_or_count() -> None:
    sim = started(workers={"nodes": 2, "minNodes": 1, "maxNodes": 4}, training={"globalBatchSize": 12})
    sim.spec["workers"]["nodes"] = 3
    assert sim.step(1).create == [2] and sim.restarts == 0
    sim.run_all()
    sim.spec["workers"]["nodes"] = 1
    p = sim.step(1)
    assert sorted(d.name for d in p.delete) == ["job-worker-1", "job-worker-2"] and not p.create
    assert sim.restarts == 0 and sim.status["workers"]["desired"] == 1 and sim.phase == "Running"
    assert "Scaled: workers 3 → 1" in sim.events("Scaled")


def test_scale_to_a_size_the_batch_does_not_split_over_is_rejected_while_running() -> None:
    sim = started(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3})  # 16 sequences: not over 3
    sim.spec["workers"]["nodes"] = 3
    p = sim.step(1)
    assert not p.create and sim.phase == "Running" and sim.status["workers"]["desired"] == 2
    assert sim.events("ScaleRejected")


def test_lost_and_deleted_workers_are_counted_and_recreated() -> None:
    sim = started(runPolicy={"restartBackoffSeconds": 0}, workers={"nodes": 3}, training={"globalBatchSize": 12})
    sim.gone(2)  # force-deleted: gone without a trace
    assert sim.step(1).create == [2] and sim.restarts == 1
    assert sim.events("WorkerLost")
    sim.run_all()
    sim.step(1)
    sim.pods[1] = replace(sim.pods[1], terminating=True, deletion_time=sim.now)  # evicted / drained
    p = sim.step(1)
    assert sim.restarts == 2 and not p.create and not p.delete  # it is going away by itself
    sim.gone(1)
    assert sim.step(1).create == [1] and sim.restarts == 2


def test_below_min_nodes_past_the_grace_restarts_all_and_forces_stuck_pods() -> None:
    sim = started(workers={"nodes": 2})
    sim.graceful = True
    sim.pods[1] = replace(sim.pods[1], terminating=True, deletion_time=sim.now)  # its node is gone
    sim.step(1)
    assert sim.restarts == 1 and sim.phase == "Restarting"
    assert sim.step(10).restarts == []
    p = sim.step(25)  # past the 30 s grace
    assert p.restarts == ["BelowMinNodes"] and sim.restarts == 2
    assert {d.name: d.force for d in p.delete} == {"job-worker-0": False, "job-worker-1": True}


def test_a_stalled_job_restarts_all_workers() -> None:
    sim = started(runPolicy={"stallTimeoutSeconds": 100})
    sim.status["progress"] = {"step": 7, "stepTime": "1970-01-12T13:46:50Z"}
    assert sim.step(50).restarts == []
    p = sim.step(60)
    assert p.restarts == ["Stalled"] and len(p.delete) == 2 and sim.phase == "Restarting"
    assert "no training step for 100s (stuck at step 7)" in sim.events("RestartingAllWorkers")[0]


def test_an_operator_restarted_mid_creation_adopts_what_exists() -> None:
    sim = Sim(spec_dict(workers={"nodes": 4}))
    sim.pods = {0: pod(0, "Running"), 1: pod(1, "Pending")}  # created before the crash, no status
    p = sim.step()
    assert p.create == [2, 3] and sim.restarts == 0 and sim.status["tracking"]["launched"] == 4


@pytest.mark.parametrize(("spec", "expected"), [
    ({"workers": {"nodes": 2, "minNodes": 3, "maxNodes": 2}}, "spec.workers.minNodes (3) must not exceed"),
    ({"workers": {"podTemplate": {"containers": []}}}, "spec.workers.podTemplate.containers: not supported"),
    ({"workers": {"podTemplate": {"tolerations": {"key": "x"}}}}, "spec.workers.podTemplate.tolerations: must be a"),
    ({"training": {"globalBatchSize": 16, "microBatchSize": 16}}, "must divide the per-process batch"),
    ({"model": {"preset": "gpt-5"}}, "spec.model.preset: Input should be"),
    ({"data": None}, "spec.data"),
])
def test_invalid_specs_fail_with_the_field_named_and_no_pods(spec: dict[str, Any], expected: str) -> None:
    p = plan(job_view(spec_dict(**spec)), {}, [], NOW)
    assert p.phase == "Failed" and not p.create
    assert p.status_patch["reason"] == "InvalidSpec" and expected in p.status_patch["message"]


def test_job_names_that_cannot_name_a_service_or_hostname_are_invalid() -> None:
    long = "a" * 60
    assert "too long for worker hostnames" in (plan(job_view(spec_dict(), name=long), {}, [], NOW).status_patch[
        "message"])
    assert "must start with a letter" in plan(job_view(spec_dict(), name="7b"), {}, [], NOW).status_patch["message"]


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    first = update_conditions([], "Running", "WorkersRunning", "2/2", 100.0)
    assert update_conditions(first, "Running", "WorkersRunning", "2/2", 200.0) == first
    later = update_conditions(first, "Succeeded", "Completed", "done", 300.0)
    assert [(c["type"], c["status"]) for c in later] == [("Running", "False"), ("Succeeded", "True")]
    assert later[0]["lastTransitionTime"] != first[0]["lastTransitionTime"]


def test_no_status_write_when_nothing_changed() -> None:
    sim = started()
    assert sim.step(1).status_patch == {}


# --- properties ---------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=10)


@given(old=st.dictionaries(st.text(max_size=4), json_values, max_size=5),
       new=st.dictionaries(st.text(max_size=4), json_values.filter(lambda v: v is not None), max_size=5))
def test_merge_patch_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    def no_nulls(v: Any) -> Any:
        return {k: no_nulls(x) for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    new = no_nulls(new)
    assert apply_merge_patch(old, merge_patch(old, new)) == new


pod_states = st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"])
events = st.one_of(
    st.tuples(st.just("phase"), st.integers(0, 4), pod_states, st.sampled_from([None, 0, 1, 2, 3, 137, 143])),
    st.tuples(st.just("gone"), st.integers(0, 4)),
    st.tuples(st.just("terminating"), st.integers(0, 4)),
    st.tuples(st.just("time"), st.floats(0, 700)),
    st.tuples(st.just("suspend"), st.booleans()),
    st.tuples(st.just("nodes"), st.integers(1, 4)),
    st.tuples(st.just("stall"), st.integers(0, 3)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(events, max_size=25), max_restarts=st.integers(0, 4), graceful=st.booleans())
def test_any_history_keeps_the_invariants(script: list[tuple[Any, ...]], max_restarts: int, graceful: bool) -> None:
    """Whatever happens to the pods and the spec: the planner never raises, never creates over an
    existing pod (Sim asserts it), never counts one failure twice, keeps restarts within maxRestarts,
    creates nothing once suspended or finished, and writes a status that fits the CRD schema."""
    sim = Sim(spec_dict(workers={"nodes": 2, "minNodes": 1, "maxNodes": 4}, training={"globalBatchSize": 12},
                        runPolicy={"maxRestarts": max_restarts, "restartBackoffSeconds": 5,
                                   "stallTimeoutSeconds": 300}), graceful=graceful)
    injected = 0
    sim.step()
    for event in script:
        kind = event[0]
        if kind == "phase" and event[1] in sim.pods:
            p = sim.pods[event[1]]
            if event[2] == "Failed" and p.phase != "Failed" and not p.terminating:
                injected += 1
            sim.pods[event[1]] = replace(p, phase=event[2], exit_code=event[3] if event[2] in (
                "Failed", "Succeeded") else None)
        elif kind == "gone" and event[1] in sim.pods:
            injected += 1
            sim.gone(event[1])
        elif kind == "terminating" and event[1] in sim.pods and not sim.pods[event[1]].terminating:
            injected += 1
            sim.pods[event[1]] = replace(sim.pods[event[1]], terminating=True, deletion_time=sim.now)
        elif kind == "time":
            sim.now += event[1]
        elif kind == "suspend":
            sim.spec["runPolicy"]["suspend"] = event[1]
        elif kind == "nodes":
            sim.spec["workers"]["nodes"] = event[1]
        elif kind == "stall":
            sim.status["progress"] = {"step": event[1], "stepTime": "1970-01-12T13:46:40Z"}
        before_phase, before_restarts = sim.phase, sim.restarts
        p = sim.step()
        again = sim.step()  # at once: nothing new to count
        assert again.restarts == []
        assert sim.restarts >= before_restarts and sim.restarts <= max_restarts
        if before_phase in ("Succeeded", "Failed"):
            assert sim.phase == before_phase and not p.create
        if sim.spec["runPolicy"].get("suspend") and before_phase not in ("Succeeded", "Failed"):
            # (worker 0 may still finish the job, or fail it for good, while it stops)
            assert not p.create and not again.create and sim.phase in ("Suspended", "Succeeded", "Failed")
        assert set(p.create) <= set(range(sim.spec["workers"]["nodes"]))
        JobStatus.model_validate(copy.deepcopy({k: v for k, v in sim.status.items() if k != "progress"}))
    counted = sum(1 for q in sim.plans for r in q.restarts if r not in ("BelowMinNodes", "Stalled"))
    assert counted <= injected


def test_pods_not_named_as_ours_are_ignored() -> None:
    impostor = ObservedPod(name="other-worker-0", index=0, uid="x", phase="Failed", exit_code=2)
    p = plan(job_view(spec_dict()), {}, [impostor], NOW, PlannerConfig())
    assert p.create == [0, 1] and p.phase == "Pending"


def test_garbage_status_is_tolerated() -> None:
    garbage = {"phase": 3, "restarts": "x", "conditions": "no", "tracking": {"replacing": [1], "launched": -4},
               "startTime": {"a": 1}}
    p = plan(job_view(spec_dict()), garbage, [failed(0, uid="u0")], NOW)
    assert p.phase in ("Pending", "Restarting", "Running")
