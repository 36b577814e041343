"""planner.py, the reconcile planner as a whole, a pure function: (job, status, observed pods, now) → actions
and status. Which policy applies when, the phase, pods not ours; and a Hypothesis test that drives random
histories and checks the invariants. Each policy's own rules: tests/operator/policies/."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetrain_api.status import JobStatus
from kubetrain_operator.planner import PlannerConfig, plan
from kubetrain_operator.pods import ObservedPod
from support import spec_dict
from support.operator import Sim, job_view

NOW = 1_000_000.0


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
    assert sim.status["conditions"][0] == {"type": "Running", "status": "True", "reason": "WorkersRunning",
                                           "message": "2/3 workers running",
                                           "lastTransitionTime": sim.status["conditions"][0]["lastTransitionTime"]}
    assert [c["type"] for c in sim.status["conditions"]] == ["Running", "ProgressKnown"]


def test_scale_to_a_size_the_batch_does_not_split_over_is_rejected_while_running(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 2, "minNodes": 1, "maxNodes": 3})  # 16 sequences: not over 3
    sim.spec["workers"]["nodes"] = 3
    p = sim.step(1)
    assert not p.create and sim.phase == "Running" and sim.status["workers"]["desired"] == 2
    assert sim.events("ScaleRejected")


def test_pods_not_named_as_ours_are_ignored() -> None:
    impostor = ObservedPod(name="other-worker-0", index=0, uid="x", phase="Failed", exit_code=2)
    p = plan(job_view(spec_dict()), {}, [impostor], NOW, PlannerConfig())
    assert p.create == [0, 1] and p.phase == "Pending"


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


def test_worker_0s_final_report_brings_progress_and_checkpoint_to_the_end(started: Callable[..., Sim]) -> None:
    sim = started(training={"maxSteps": 120})
    sim.status["progress"], sim.status["checkpoint"] = {"step": 115, "maxSteps": 120}, {"step": 90}
    report = {"step": 120, "loss": 2.3456789, "evalLoss": 2.5, "phase": "done",
              "checkpoint": {"step": 120, "uri": "s3://b/job/step-000000120", "time": 1000.0}}
    sim.set(0, "Succeeded", exit_code=0, report=report)
    sim.step(1)
    assert sim.phase == "Succeeded"
    progress = sim.status["progress"]
    assert (progress["step"], progress["maxSteps"], progress["loss"], progress["evalLoss"], progress["phase"]) == (
        120, 120, 2.346, 2.5, "done")
    assert sim.status["checkpoint"] == {"step": 120, "uri": "s3://b/job/step-000000120",
                                        "time": "1970-01-01T00:16:40Z"}


def test_a_suspended_worker_0s_sigterm_report_moves_the_checkpoint_forward(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 1}, training={"globalBatchSize": 8})
    sim.graceful = True
    sim.status["progress"], sim.status["checkpoint"] = {"step": 44, "maxSteps": 100}, {"step": 30}
    sim.spec["runPolicy"]["suspend"] = True
    sim.step(1)
    assert sim.phase == "Suspended" and sim.pods[0].terminating
    entry = {"step": 45, "uri": "s3://b/job/step-000000045", "time": 1000.0}
    report = {"step": 45, "loss": 2.4, "evalLoss": 2.5, "evalPerplexity": 12.18, "checkpoint": entry,
              "checkpoints": [entry]}
    sim.set(0, "Failed", exit_code=143, report=report)  # its container ended after the SIGTERM checkpoint
    sim.step(1)
    assert sim.phase == "Suspended" and sim.status["progress"]["step"] == 45
    assert sim.status["progress"]["evalPerplexity"] == 12.18
    assert sim.status["checkpoint"] == {"step": 45, "uri": "s3://b/job/step-000000045",
                                        "time": "1970-01-01T00:16:40Z"}
    assert sim.status["checkpoints"] == [sim.status["checkpoint"]]
    JobStatus.model_validate(copy.deepcopy(sim.status))  # the new fields are in the status schema
