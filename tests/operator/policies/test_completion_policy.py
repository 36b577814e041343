"""policies/completion.py: worker 0's exit 0 succeeds the job; then runPolicy.cleanPodPolicy for its pods
and ttlSecondsAfterFinished for the job itself."""

from __future__ import annotations

from collections.abc import Callable

from support.operator import Sim


def test_worker0_success_succeeds_cleans_up_per_policy_and_expires(started: Callable[..., Sim]) -> None:
    for policy, left in (("Running", {0, 1}), ("All", set()), ("None", {0, 1, 2})):
        sim = started(workers={"nodes": 3}, training={"globalBatchSize": 12},
                      runPolicy={"cleanPodPolicy": policy, "ttlSecondsAfterFinished": 60})
        sim.set(0, "Succeeded", exit_code=0)
        sim.set(1, "Succeeded", exit_code=0)
        p = sim.step(1)
        assert sim.phase == "Succeeded" and sim.status["completionTime"] and set(sim.pods) == left, policy
        assert p.requeue_after == 60 and not p.delete_job
        assert sim.step(60).delete_job
