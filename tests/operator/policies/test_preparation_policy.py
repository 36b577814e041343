"""policies/preparation.py: from the observed stage Jobs and pods, create the next Job, wait (Preparing), let the
workers start, or fail with the stage pod's own message; the single worker's init container likewise."""

from __future__ import annotations

from typing import Any

from kubetrain_api.manifest import API_VERSION, KIND, JobSpec
from kubetrain_operator.policies.preparation import Decision, decide, decide_init, gate, init_waiting
from kubetrain_operator.preparation import StageJob, StagePod
from support import spec_dict


def spec(**preparation: Any) -> JobSpec:
    return JobSpec.model_validate(spec_dict(tokenizer={"path": None, "train": {"vocabSize": 512}},
                                            data={"train": "s3://b/raw/", "validation": None},
                                            checkpoint={"uri": "s3://b/ck/"}, preparation=preparation))


def test_one_job_is_created_waited_for_and_then_the_workers_may_start() -> None:
    s = spec()
    assert decide("tiny", s, [], []) == Decision("create", "all", "Preparing",
                                                  "tiny-prepare: creating the data preparation Job")
    running = StageJob("tiny-prepare", "u1", "all", active=1)
    d = decide("tiny", s, [running], [])
    assert (d.action, d.step, d.reason) == ("wait", "all", "Preparing")
    assert decide("tiny", s, [StageJob("tiny-prepare", "u1", "all", complete=True, succeeded=1)], []).action == "done"


def test_the_fan_out_runs_tokenizer_then_parts_then_merge_each_after_the_last_completed() -> None:
    s = spec(parts=3)
    tok = StageJob("tiny-tokenizer", "u1", "tokenizer", complete=True)
    parts = StageJob("tiny-prepare", "u2", "part", succeeded=2, active=1)
    assert decide("tiny", s, [], []).step == "tokenizer"
    assert decide("tiny", s, [StageJob("tiny-tokenizer", "u1", "tokenizer", active=1)], []).action == "wait"
    assert decide("tiny", s, [tok], []) == Decision("create", "part", "Preparing",
                                                     "tiny-prepare: creating the data preparation Job")
    waiting = decide("tiny", s, [tok, parts], [])
    assert waiting.action == "wait" and "(2/3 parts done)" in waiting.message
    done_parts = StageJob("tiny-prepare", "u2", "part", complete=True, succeeded=3)
    assert decide("tiny", s, [tok, done_parts], []).step == "merge"
    merged = StageJob("tiny-merge", "u3", "merge", complete=True)
    assert decide("tiny", s, [tok, done_parts, merged], []).action == "done"


def test_a_failed_job_fails_with_the_newest_failed_pods_message_else_the_jobs() -> None:
    s = spec()
    failed = StageJob("tiny-prepare", "u1", "all", failed=True, message="Job has reached the specified backoff limit")
    old = StagePod("tiny-prepare-0-aaaaa", "all", "Failed", 1, "Traceback: timeout", created="2026-01-01T00:00:00Z")
    new = StagePod("tiny-prepare-0-bbbbb", "all", "Failed", 2, "error: data.train: no input files match",
                   created="2026-01-01T00:01:00Z")
    other = StagePod("tiny-prepare-0-ccccc", "all", "Running", created="2026-01-01T00:02:00Z")
    d = decide("tiny", s, [failed], [old, new, other])
    assert d == Decision("failed", "all", "PreparationFailed",
                         "tiny-prepare: data preparation failed (exit 2): error: data.train: no input files match")
    assert decide("tiny", s, [failed], []).message == (
        "tiny-prepare: data preparation failed: Job has reached the specified backoff limit")


def test_a_deleted_job_is_waited_for_before_it_is_created_again() -> None:
    gone = StageJob("tiny-prepare", "u1", "all", terminating=True)
    assert decide("tiny", spec(), [gone], []).action == "wait"


def test_the_init_container_is_preparing_while_it_runs_and_exit_2_fails_the_job() -> None:
    assert decide_init([]).action == "done"
    running = StagePod("tiny-worker-0", "all", "Running", init=True)
    assert decide_init([running]).action == "wait" and decide_init([running]).reason == "Preparing"
    bad = StagePod("tiny-worker-0", "all", "Failed", 2, "error: data.train: no input files match", init=True)
    d = decide_init([bad])
    assert d.action == "failed" and d.message.endswith("(exit 2): error: data.train: no input files match")
    assert decide_init([StagePod("tiny-worker-0", "all", "Failed", 137, None, init=True)]).action == "done"
    assert decide_init([StagePod("tiny-worker-0", "all", "Succeeded", 0, None, init=True)]).action == "done"


def _draft(s: JobSpec, pods: list[Any] | None = None) -> Any:
    from kubetrain_operator.draft import Draft, JobView, PlannerConfig
    from kubetrain_operator.render import JobRef

    return Draft(JobView(JobRef("tiny", "ml", "uid-1"), s), {}, pods or [], 1000.0, PlannerConfig())


def test_the_gate_holds_the_workers_until_the_stage_is_done_and_never_once_they_run() -> None:
    from kubetrain_operator.ownership import Owner
    from kubetrain_operator.pods import ObservedPod
    from kubetrain_operator.preparation import StageView

    s = spec()
    assert gate(_draft(s), s, StageView()) == Decision("create", "all", "Preparing",
                                                       "tiny-prepare: creating the data preparation Job")
    running = StageView([StageJob("tiny-prepare", "u1", "all", active=1)])
    assert gate(_draft(s), s, running).action == "wait"  # type: ignore[union-attr]
    assert gate(_draft(s), s, StageView([StageJob("tiny-prepare", "u1", "all", complete=True)])) is None
    worker = ObservedPod("tiny-worker-0", 0, "w0", phase="Running", owner=Owner(API_VERSION, KIND, "tiny", "uid-1"))
    assert gate(_draft(s, [worker]), s, StageView()) is None  # a launched group already has its data
    prepared = JobSpec.model_validate(spec_dict())
    assert gate(_draft(prepared), prepared, StageView()) is None


def test_the_init_mode_gate_fails_on_exit_2_and_otherwise_lets_the_worker_prepare() -> None:
    from kubetrain_operator.preparation import StageView

    s = JobSpec.model_validate(spec_dict(tokenizer={"path": None, "train": {"vocabSize": 512}},
                                         data={"train": "corpus://shakespeare", "validation": None},
                                         checkpoint={"uri": None}, workers={"nodes": 1}))
    running = StageView(pods=[StagePod("tiny-worker-0", "all", "Running", init=True)])
    assert gate(_draft(s), s, running) is None and init_waiting(s, running) is not None
    bad = StageView(pods=[StagePod("tiny-worker-0", "all", "Failed", 2, "error: data.train", init=True)])
    assert gate(_draft(s), s, bad).action == "failed"  # type: ignore[union-attr]
    assert init_waiting(s, StageView()) is None
