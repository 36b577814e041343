"""policies/workers.py: which worker pods to create and delete for the job's size: scaling up and down
(a graceful stop of the group, whose SIGTERM checkpoint the relaunch at the new size resumes from; never a
restart), and adopting the pods that exist when the operator restarted mid-creation."""

from __future__ import annotations

from collections.abc import Callable

from support import spec_dict
from support.operator import Sim, pod


def test_scale_up_and_down_reform_the_group_after_a_checkpoint_and_never_count(started: Callable[..., Sim]) -> None:
    sim = started(workers={"nodes": 2, "minNodes": 1, "maxNodes": 4}, training={"globalBatchSize": 12})
    sim.graceful = True
    sim.spec["workers"]["nodes"] = 3
    p = sim.step(1)
    # Every worker gets SIGTERM with its own grace period: the ranks agree on a step and commit it
    assert {d.name: (d.force, d.grace_seconds) for d in p.delete} == {
        "job-worker-0": (False, None), "job-worker-1": (False, None)} and not p.create
    assert (sim.phase, sim.status["reason"], sim.restarts) == ("Restarting", "Resizing", 0)
    assert sim.events("Scaled") == ["Scaled: workers 2 → 3: checkpointing the current step, then re-forming the group"]
    assert not sim.events("RestartingAllWorkers") and sim.plans[-1].events[-1].type == "Normal"
    assert sim.step(5).create == []  # the relaunch waits until the old group has committed and gone
    sim.gone(0)
    sim.gone(1)
    p = sim.step(1)
    assert p.create == [0, 1, 2] and p.launch and sim.restarts == 0
    sim.run_all()
    sim.step(1)
    assert sim.phase == "Running" and not sim.status["tracking"]["resizing"]
    sim.spec["workers"]["nodes"] = 1
    p = sim.step(1)
    assert sorted(d.name for d in p.delete) == ["job-worker-0", "job-worker-1", "job-worker-2"] and not p.create
    assert sim.status["workers"]["desired"] == 1
    for i in (0, 1, 2):
        sim.gone(i)
    assert sim.step(1).create == [0] and sim.restarts == 0


def test_an_operator_restarted_mid_creation_adopts_what_exists() -> None:
    sim = Sim(spec_dict(workers={"nodes": 4}))
    sim.pods = {0: pod(0, "Running"), 1: pod(1, "Pending")}  # created before the crash, no status
    p = sim.step()
    assert p.create == [2, 3] and sim.restarts == 0 and sim.status["tracking"]["launched"] == 4
