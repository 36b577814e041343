"""Data preparation before the workers (preparation.py): from the stage's Jobs and pods as observed, create the
next Job, wait (phase Preparing), go on to the workers, or fail the job with the stage's own message.

A stage pod that exits 2 (its input or configuration is wrong, e.g. no file matches data.train) fails its Job
at once through the Job's podFailurePolicy; other failures are retried by the Job (backoffLimit) and fail it
when they keep failing. Either way the LLMTrainingJob fails at once, never retried by the operator, with the
newest failed pod's termination message (the stage's last lines), else the Job's condition message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetrain_api.exit_codes import EXIT_CONFIG
from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from ..preparation import StageJob, StagePod, StageView, completions, job_name, mode, steps

Action = Literal["create", "wait", "done", "failed"]


@dataclass(frozen=True)
class Decision:
    action: Action
    step: str | None = None  # create: the Job's step; wait: the step under way
    reason: str = ""
    message: str = ""


def decide(job: str, spec: JobSpec, jobs: list[StageJob], pods: list[StagePod]) -> Decision:
    """The stage's Jobs (mode `job`), in order: the first not yet complete decides."""
    by_name = {j.name: j for j in jobs}
    for step in steps(spec):
        name = job_name(job, step)
        observed = by_name.get(name)
        if observed is None:
            return Decision("create", step, "Preparing", f"{name}: creating the data preparation Job")
        if observed.failed:
            return Decision("failed", step, "PreparationFailed", _failure(name, observed, pods, step))
        if observed.terminating:  # deleted by someone: wait until it is gone, then create it again
            return Decision("wait", step, "Preparing", f"{name}: waiting for the deleted Job to go")
        if not observed.complete:
            total = completions(spec, step)
            done = f" ({observed.succeeded}/{total} parts done)" if total > 1 else ""
            return Decision("wait", step, "Preparing", f"{name}: preparing the data ({_what(step)}){done}")
    return Decision("done", None, "Prepared", "data prepared")


def decide_init(pods: list[StagePod]) -> Decision:
    """Mode `init`: the worker's init container. Exit 2 fails the job at once; while it runs, Preparing; any
    other end is the worker's (the restart policy counts it)."""
    for pod in sorted((p for p in pods if p.init), key=lambda p: p.created, reverse=True):
        if pod.phase == "Failed" and pod.exit_code == EXIT_CONFIG:
            return Decision("failed", "all", "PreparationFailed",
                            f"{pod.name}: the data preparation rejected its input (exit {pod.exit_code})"
                            f"{_detail(pod.message)}")
        if pod.phase in ("Pending", "Running"):
            return Decision("wait", "all", "Preparing",
                            f"{pod.name}: preparing the data in its init container before torchrun")
    return Decision("done", None, "Prepared", "data prepared")


def _what(step: str) -> str:
    return {"all": "tokenizer, tokenisation, shards", "tokenizer": "the tokenizer", "part": "tokenising the parts",
            "merge": "merging the index"}[step]


def _detail(message: str | None) -> str:
    return f": {message.strip()[-600:]}" if message and message.strip() else ""


def _failure(name: str, job: StageJob, pods: list[StagePod], step: str) -> str:
    failed = sorted((p for p in pods if not p.init and p.step == step and p.name.startswith(name + "-")
                     and p.phase == "Failed"), key=lambda p: p.created, reverse=True)
    if failed:
        pod = failed[0]
        code = f" (exit {pod.exit_code})" if pod.exit_code is not None else ""
        return f"{name}: data preparation failed{code}{_detail(pod.message)}"
    return f"{name}: data preparation failed{_detail(job.message)}"


def gate(d: Draft, spec: JobSpec, stage: StageView) -> Decision | None:
    """The planner's gate before the workers: None when they may start (or go on), else the decision to apply
    (create the step's Job and be Preparing, wait and be Preparing, or fail). The stage is consulted only while
    no worker is alive: a launched group has its data. Mode `init` gates nothing but its failure (the worker
    pod itself prepares); see init_waiting for its phase."""
    m = mode(spec)
    if m == "none":
        return None
    if m == "init":
        decision = decide_init(stage.pods)
        return decision if decision.action == "failed" else None
    if any(p.alive for p in d.pods.values()):
        return None
    decision = decide(d.job.ref.name, spec, stage.jobs, stage.pods)
    return None if decision.action == "done" else decision


def init_waiting(spec: JobSpec, stage: StageView) -> Decision | None:
    """Mode `init`: the worker's init container is preparing (the planner shows Preparing while it is Pending)."""
    if mode(spec) != "init":
        return None
    decision = decide_init(stage.pods)
    return decision if decision.action == "wait" else None
