"""policies/elastic.py: fewer workers alive than workers.minNodes for longer than the grace period restarts
all of them, force-deleting the pods stuck terminating; a restart's pods stuck terminating are force-deleted
too (policies/workers.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from support.operator import Sim


def test_a_worker_stuck_terminating_on_a_lost_node_is_force_deleted_to_relaunch(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 2})
    sim.graceful = True
    sim.pods[1] = replace(sim.pods[1], terminating=True, deletion_time=sim.now)  # its node is gone
    sim.step(1)
    assert sim.restarts == 1 and sim.phase == "Restarting"
    # Stopped with the failure's 30 s grace, then PlannerConfig's 30 s: stuck after 60 s
    p = sim.step(58)
    assert p.restarts == [] and not p.delete and p.requeue_after == 2
    p = sim.step(2)
    assert {d.name: d.force for d in p.delete} == {"job-worker-0": True, "job-worker-1": True}
    assert sim.restarts == 1 and sim.events("ForceDeleted")
    assert sim.step(1).create == [0, 1] and sim.restarts == 1
