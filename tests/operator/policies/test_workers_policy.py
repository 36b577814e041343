"""policies/workers.py: which worker pods to create and delete for the job's size: scaling up and down
(never a restart), and adopting the pods that exist when the operator restarted mid-creation."""

from __future__ import annotations

from collections.abc import Callable

from support import spec_dict
from support.operator import Sim, pod


def test_scale_up_and_down_never_restart_or_count(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 2, "minNodes": 1, "maxNodes": 4}, training={"globalBatchSize": 12})
    sim.spec["workers"]["nodes"] = 3
    assert sim.step(1).create == [2] and sim.restarts == 0
    sim.run_all()
    sim.spec["workers"]["nodes"] = 1
    p = sim.step(1)
    assert sorted(d.name for d in p.delete) == ["job-worker-1", "job-worker-2"] and not p.create
    assert sim.restarts == 0 and sim.status["workers"]["desired"] == 1 and sim.phase == "Running"
    assert "Scaled: workers 3 → 1" in sim.events("Scaled")


def test_an_operator_restarted_mid_creation_adopts_what_exists() -> None:
    sim = Sim(spec_dict(workers={"nodes": 4}))
    sim.pods = {0: pod(0, "Running"), 1: pod(1, "Pending")}  # created before the crash, no status
    p = sim.step()
    assert p.create == [2, 3] and sim.restarts == 0 and sim.status["tracking"]["launched"] == 4
