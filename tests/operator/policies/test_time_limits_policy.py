"""policies/time_limits.py: runPolicy.activeDeadlineSeconds fails a job that runs too long and stops its
workers (whatever cleanPodPolicy says)."""

from __future__ import annotations

from collections.abc import Callable

from support.operator import Sim


def test_deadline_fails_and_stops_workers_even_with_clean_pod_policy_none(started: Callable[..., Sim]) -> None:
    sim = started(runPolicy={"activeDeadlineSeconds": 100, "cleanPodPolicy": "None"})
    assert sim.plans[-1].requeue_after is not None and sim.plans[-1].requeue_after <= 100
    sim.step(100)
    assert sim.phase == "Failed" and sim.status["reason"] == "DeadlineExceeded" and not sim.pods
