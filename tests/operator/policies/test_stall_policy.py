"""policies/stall.py: no new training step for runPolicy.stallTimeoutSeconds while running restarts all
workers."""

from __future__ import annotations

from collections.abc import Callable

from support.operator import Sim


def test_a_stalled_job_restarts_all_workers(started: Callable[..., Sim]) -> None:
    sim = started(runPolicy={"stallTimeoutSeconds": 100})
    sim.status["progress"] = {"step": 7, "stepTime": "1970-01-12T13:46:50Z"}
    assert sim.step(50).restarts == []
    p = sim.step(60)
    assert p.restarts == ["Stalled"] and len(p.delete) == 2 and sim.phase == "Restarting"
    assert "no training step for 100s (stuck at step 7)" in sim.events("RestartingAllWorkers")[0]
