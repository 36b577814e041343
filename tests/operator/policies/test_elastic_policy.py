"""policies/elastic.py: fewer workers alive than workers.minNodes for longer than the grace period restarts
all of them, force-deleting the pods stuck terminating."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from support.operator import Sim


def test_below_min_nodes_past_the_grace_restarts_all_and_forces_stuck_pods(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 2})
    sim.graceful = True
    sim.pods[1] = replace(sim.pods[1], terminating=True, deletion_time=sim.now)  # its node is gone
    sim.step(1)
    assert sim.restarts == 1 and sim.phase == "Restarting"
    assert sim.step(10).restarts == []
    p = sim.step(25)  # past the 30 s grace
    assert p.restarts == ["BelowMinNodes"] and sim.restarts == 2
    assert {d.name: d.force for d in p.delete} == {"job-worker-0": False, "job-worker-1": True}
