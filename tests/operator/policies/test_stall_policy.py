"""policies/stall.py: no new training step for runPolicy.stallTimeoutSeconds while running restarts all
workers."""

from __future__ import annotations

from collections.abc import Callable

from support.operator import Sim


def test_a_stalled_job_restarts_all_workers(started: Callable[..., Sim]) -> None:
    sim = started(runPolicy={"stallTimeoutSeconds": 100})
    sim.status["progress"] = {"step": 7, "stepTime": "1970-01-12T13:46:50Z"}
    sim.progress_read = sim.now
    assert sim.step(50).restarts == []
    sim.progress_read = sim.now + 60  # read after the deadline: still step 7
    p = sim.step(60)
    assert p.restarts == ["Stalled"] and len(p.delete) == 2 and sim.phase == "Restarting"
    assert "no training step for 100s (stuck at step 7)" in sim.events("RestartingAllWorkers")[0]


def test_unreadable_progress_is_unknown_never_a_stall(started: Callable[..., Sim]) -> None:
    """metrics.port set but /progress never answers (a NetworkPolicy): no stall restart, ever; ProgressKnown
    says why. A later answer showing no new step is a stall."""
    sim = started(runPolicy={"stallTimeoutSeconds": 100})
    sim.status["progress"] = {"step": 7, "stepTime": "1970-01-12T13:46:50Z"}
    for _ in range(20):
        assert sim.step(300).restarts == []
    assert sim.phase == "Running" and sim.restarts == 0
    known = next(c for c in sim.status["conditions"] if c["type"] == "ProgressKnown")
    assert (known["status"], known["reason"]) == ("False", "ProgressUnreadable")
    assert "stall detection is paused" in known["message"]
    sim.progress_read = sim.now + 1
    assert sim.step(1).restarts == ["Stalled"]


def test_metrics_port_0_disables_stall_detection_and_says_so(started: Callable[..., Sim]) -> None:
    sim = started(runPolicy={"stallTimeoutSeconds": 100}, metrics={"port": 0})
    assert sim.step(5000).restarts == [] and sim.phase == "Running"
    known = next(c for c in sim.status["conditions"] if c["type"] == "ProgressKnown")
    assert (known["status"], known["reason"]) == ("False", "MetricsDisabled")
