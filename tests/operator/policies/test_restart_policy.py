"""policies/restart.py: which pod ends count as restarts (each once), runPolicy.maxRestarts, the
exponential backoff, one failure restarting the whole group once (the survivors stopped with a short grace,
their own exits part of it), and the exits restarting cannot help (the job fails)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from kubetrain_operator.policies.restart import backoff_seconds
from support.operator import Sim


def test_a_failed_worker_restarts_the_group_once_after_backoff(started: Callable[..., Sim]) -> None:
    sim = started()
    sim.graceful = True
    sim.set(1, "Failed", exit_code=137, container_reason="Error")
    p = sim.step(1)
    # The survivor cannot go on alone (one torchrun round per pod) nor checkpoint without rank 1: short grace
    assert {d.name: d.grace_seconds for d in p.delete} == {"job-worker-0": sim.cfg.failed_group_grace_seconds,
                                                           "job-worker-1": None}
    assert sim.restarts == 1 and not p.create and p.restarts == ["Signal"] and sim.phase == "Restarting"
    assert sim.events("WorkerSignal") == [
        "WorkerSignal: job-worker-1 was killed by SIGKILL (exit 137); restart 1 of 3, all workers in 10s"]
    # Its collective fails when the peer goes: the same incident, never a second restart
    sim.set(0, "Failed", exit_code=1, container_reason="Error")
    assert sim.step(0).restarts == [] and sim.restarts == 1
    sim.gone(0)
    sim.gone(1)
    assert sim.step(5).create == []  # backing off
    p = sim.step(5)
    assert p.create == [0, 1] and p.launch and sim.restarts == 1
    sim.run_all()
    sim.step(1)
    assert sim.phase == "Running" and sim.status["tracking"]["replacing"] == {}
    sim.set(1, "Failed", exit_code=1, container_reason="Error")  # a later failure is a second restart
    assert sim.step(1).restarts == ["Error"] and sim.restarts == 2


def test_the_cause_named_is_the_lost_worker_not_the_survivors_error(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 3}, training={"globalBatchSize": 12})
    sim.set(0, "Failed", exit_code=1, container_reason="Error")  # gloo: connection closed by peer
    sim.set(2, "Failed", exit_code=137, container_reason="OOMKilled")
    p = sim.step(1)
    assert p.restarts == ["OOMKilled"] and sim.restarts == 1
    assert "job-worker-2 ran out of memory" in sim.events("RestartingAllWorkers")[0]


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(10, n, 600) for n in (1, 2, 3, 7, 8)] == [10, 20, 40, 600, 600]
    assert backoff_seconds(0, 5, 600) == 0


def test_worker0_failure_restarts_all_workers_once(started: Callable[..., Sim]) -> None:
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
def test_deterministic_failures_fail_the_job_without_restarts(code: int, reason: str,
                                                              started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 3}, training={"globalBatchSize": 12})
    sim.set(2, "Failed", exit_code=code, termination_message="spec.training.seed: bad")
    p = sim.step(1)
    assert sim.phase == "Failed" and sim.status["reason"] == reason and sim.restarts == 0
    assert "spec.training.seed: bad" in sim.status["message"] and not p.create
    assert sorted(d.name for d in p.delete) == ["job-worker-0", "job-worker-1"]  # cleanPodPolicy Running
    assert sim.step(100).create == [] and sim.phase == "Failed"  # terminal stays terminal


def test_restarts_beyond_max_restarts_fail_the_job(started: Callable[..., Sim]) -> None:
    sim = started(runPolicy={"maxRestarts": 1, "restartBackoffSeconds": 0})
    sim.set(1, "Failed", exit_code=1)
    sim.step(1)
    sim.step(1)
    sim.run_all()
    sim.set(1, "Failed", exit_code=1)
    sim.step(1)
    assert sim.phase == "Failed" and sim.status["reason"] == "MaxRestartsExceeded"
    assert "runPolicy.maxRestarts: 1" in sim.status["message"] and sim.restarts == 1


def test_lost_and_deleted_workers_are_counted_and_the_group_relaunched(started: Callable[..., Sim]) -> None:
    sim = started(runPolicy={"restartBackoffSeconds": 0}, workers={"nodes": 3}, training={"globalBatchSize": 12})
    sim.gone(2)  # force-deleted: gone without a trace
    p = sim.step(1)
    assert sorted(d.name for d in p.delete) == ["job-worker-0", "job-worker-1"] and sim.restarts == 1
    assert sim.events("WorkerLost")
    assert sim.step(1).create == [0, 1, 2] and sim.restarts == 1
    sim.run_all()
    sim.step(1)
    sim.pods[1] = replace(sim.pods[1], terminating=True, deletion_time=sim.now)  # evicted / drained
    p = sim.step(1)
    # It is going away by itself; the others are stopped
    assert sim.restarts == 2 and not p.create and sorted(d.name for d in p.delete) == ["job-worker-0", "job-worker-2"]
    sim.gone(1)
    assert sim.step(1).create == [0, 1, 2] and sim.restarts == 2
