"""policies/suspend.py: runPolicy.suspend stops every worker without counting a restart (nor running into
the deadline); a resume waits for the old workers to go, then relaunches."""

from __future__ import annotations

from collections.abc import Callable

from support.operator import Sim


def test_suspend_stops_workers_and_resume_waits_for_them_then_relaunches(started: Callable[..., Sim]) -> None:
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
