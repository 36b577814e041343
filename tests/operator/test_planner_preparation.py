"""The planner with data preparation (planner.py + policies/preparation.py), on the in-memory cluster: the stage's
batch Jobs come before any worker (phase Preparing, one Job per step, each once), a failed stage fails the job at
once with the stage pod's message, and a single worker's init container shows Preparing and fails the job on
exit 2."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from kubetrain_api.status import JobStatus
from kubetrain_operator.preparation import StageJob, StagePod, StageView
from support import spec_dict
from support.operator import Sim, pod

RAW = {"tokenizer": {"path": None, "train": {"vocabSize": 512}},
       "data": {"train": "s3://b/raw/*.txt", "validation": None}}


def raw_sim(**sections: Any) -> Sim:
    return Sim(spec_dict(**{**copy.deepcopy(RAW), "checkpoint": {"uri": "s3://b/ck/"}, **sections}))


def finish(sim: Sim, name: str, **fields: Any) -> None:
    """The stage Job `name` as the Job controller reports it (default: complete)."""
    fields = fields or {"complete": True, "active": 0, "succeeded": 1}
    sim.stage.jobs[:] = [dataclasses.replace(j, **fields) if j.name == name else j for j in sim.stage.jobs]


def test_the_stage_job_runs_before_any_worker_and_once() -> None:
    sim = raw_sim()
    p = sim.step()
    assert p.prepare == "all" and p.create == [] and not sim.pods
    assert sim.phase == "Preparing" and sim.status["reason"] == "Preparing"
    assert [c["type"] for c in sim.status["conditions"] if c["status"] == "True"] == ["Preparing"]
    assert sim.events("Preparing") == ["Preparing: job-prepare: creating the data preparation Job"]
    p = sim.step(5)  # the Job is there and running: nothing more to create
    assert p.prepare is None and p.create == [] and sim.phase == "Preparing"
    assert "preparing the data" in sim.status["message"]
    finish(sim, "job-prepare")
    p = sim.step(5)
    assert p.prepare is None and p.create == [0, 1] and p.launch and sim.phase == "Pending"
    sim.run_all()
    sim.step(1)
    assert sim.phase == "Running" and [j.name for j in sim.stage.jobs] == ["job-prepare"]
    JobStatus.model_validate(copy.deepcopy(sim.status))


def test_the_fan_out_creates_tokenizer_parts_and_merge_in_turn_and_says_how_many_parts_are_done() -> None:
    sim = raw_sim(preparation={"parts": 3})
    assert sim.step().prepare == "tokenizer"
    assert sim.step(1).prepare is None
    finish(sim, "job-tokenizer")
    assert sim.step(1).prepare == "part" and sim.phase == "Preparing"
    finish(sim, "job-prepare", succeeded=2, active=1)
    assert sim.step(1).prepare is None
    assert sim.status["message"] == "job-prepare: preparing the data (tokenising the parts) (2/3 parts done)"
    finish(sim, "job-prepare", complete=True, succeeded=3, active=0)
    assert sim.step(1).prepare == "merge"
    assert sim.events("Preparing")[-1] == "Preparing: job-merge: creating the data preparation Job"
    finish(sim, "job-merge")
    assert sim.step(1).create == [0, 1]
    assert [j.step for j in sim.stage.jobs] == ["tokenizer", "part", "merge"]


def test_a_failed_stage_fails_the_job_at_once_with_the_stage_pods_message() -> None:
    sim = raw_sim()
    sim.step()
    finish(sim, "job-prepare", failed=True, active=0, message="Job has reached the specified backoff limit")
    sim.stage.pods.append(StagePod("job-prepare-0-x7k2p", "all", "Failed", 2,
                                   "error: data.train: no input file matches s3://b/raw/*.txt"))
    p = sim.step(1)
    assert sim.phase == "Failed" and sim.status["reason"] == "PreparationFailed"
    assert sim.status["message"] == ("job-prepare: data preparation failed (exit 2): "
                                     "error: data.train: no input file matches s3://b/raw/*.txt")
    assert p.create == [] and p.prepare is None and not sim.pods and sim.restarts == 0
    assert any(e.type == "Warning" and e.reason == "PreparationFailed" for e in p.events)
    later = sim.step(60)  # terminal stays terminal: nothing created again
    assert sim.phase == "Failed" and later.prepare is None and later.create == []
    JobStatus.model_validate(copy.deepcopy(sim.status))


def test_workers_already_running_are_not_gated_by_the_stage() -> None:
    """A launched group has its data: a stage Job gone later (deleted, or never observed by a new operator)
    creates nothing while workers are alive."""
    sim = raw_sim()
    sim.step()
    finish(sim, "job-prepare")
    sim.step(1)
    sim.run_all()
    sim.step(1)
    sim.stage = StageView()
    p = sim.step(1)
    assert sim.phase == "Running" and p.prepare is None and p.create == []


def test_a_job_without_raw_text_never_prepares() -> None:
    sim = Sim(spec_dict())
    sim.stage.jobs.append(StageJob("job-prepare", "u", "all", failed=True, message="not ours to read"))
    p = sim.step()
    assert p.prepare is None and p.create == [0, 1] and sim.phase == "Pending"


def init_sim() -> Sim:
    """One worker and no shared storage: the worker's init container prepares (mode init)."""
    return Sim(spec_dict(**copy.deepcopy(RAW), checkpoint={"uri": None}, workers={"nodes": 1},
                         training={"globalBatchSize": 8}))


def test_a_single_workers_init_container_shows_preparing_then_the_job_runs() -> None:
    sim = init_sim()
    p = sim.step()
    assert p.create == [0] and p.prepare is None and sim.phase == "Pending"
    sim.stage.pods.append(StagePod("job-worker-0", "all", "Running", init=True))
    sim.step(1)
    assert sim.phase == "Preparing"
    assert sim.status["message"] == "job-worker-0: preparing the data in its init container before torchrun"
    for _ in range(3):
        sim.step(1)
    assert sim.phase == "Preparing" and len(sim.events("Preparing")) == 1  # one event, no flapping phase
    assert sim.events("WorkersStarting") == ["WorkersStarting: 0/1 workers running"]  # the first pass only
    sim.stage.pods[:] = [StagePod("job-worker-0", "all", "Succeeded", 0, init=True)]
    sim.run_all()
    sim.step(1)
    assert sim.phase == "Running"


def test_an_init_container_exit_2_fails_the_job_at_once_without_a_restart() -> None:
    sim = init_sim()
    sim.step()
    sim.pods[0] = pod(0, "Failed", uid=sim.pods[0].uid)  # the trainer container never started
    sim.stage.pods.append(StagePod("job-worker-0", "all", "Failed", 2, "error: tokenizer.train: no text", init=True))
    p = sim.step(1)
    assert sim.phase == "Failed" and sim.status["reason"] == "PreparationFailed" and sim.restarts == 0
    assert sim.status["message"] == ("job-worker-0: the data preparation rejected its input (exit 2): "
                                     "error: tokenizer.train: no text")
    assert p.create == []


def test_an_init_container_failing_otherwise_is_a_worker_failure_and_restarted() -> None:
    sim = init_sim()
    sim.step()
    sim.pods[0] = pod(0, "Failed", uid=sim.pods[0].uid)  # the trainer container never started
    sim.stage.pods.append(StagePod("job-worker-0", "all", "Failed", 1, "Killed", init=True))
    sim.step(1)
    assert sim.phase != "Failed" and sim.restarts == 1


def test_a_suspend_while_preparing_stops_the_stage_and_the_resume_starts_it_again() -> None:
    sim = raw_sim()
    sim.step()
    assert [j.name for j in sim.stage.jobs] == ["job-prepare"]
    sim.spec["runPolicy"] = {"suspend": True}
    p = sim.step(5)
    assert p.stop_stage == ["job-prepare"] and sim.phase == "Suspended" and not p.create
    assert "data preparation stopped (job-prepare)" in sim.status["message"]
    assert sim.step(5).stop_stage == []  # once
    sim.stage.jobs.clear()  # gone
    sim.spec["runPolicy"] = {"suspend": False}
    p = sim.step(5)
    assert p.prepare == "all" and sim.phase == "Preparing" and not p.create
