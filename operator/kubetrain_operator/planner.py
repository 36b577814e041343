"""The reconcile planner: (job, its status, observed pods, now) → what to do and the new status.

Pure and level-triggered: every decision comes from the spec, the pods as observed now, and the
bookkeeping the operator keeps in the job's own status (bookkeeping.py), so a restarted operator
continues exactly. The controller executes a Plan; nothing here talks to Kubernetes. This module decides
which policy (policies/*.py) applies, in which order, and the phase; the policies hold the rules.
"""

from __future__ import annotations

from typing import Any

from kubetrain_api.manifest import JobSpec
from kubetrain_api.status import PENDING, PREPARING, RESTARTING, RUNNING, SUSPENDED, TERMINAL

from .bookkeeping import OWNED, merge_patch, update_conditions
from .coerce import as_count, as_dict
from .draft import RESIZING, CreateFailure, Deletion, Draft, Event, JobView, Plan, PlannerConfig
from .pods import ObservedPod
from .policies import elastic, preparation, stall, suspend, time_limits, workers
from .policies.completion import fail, finished, succeed
from .policies.restart import count_incidents, permanent_failure
from .preparation import StageView
from .progress import final_report_patch
from .render import pod_name, selector
from .timeutil import iso_precise

# The planner's interface; the types live in draft.py beside the Draft the policies edit.
__all__ = ["Deletion", "Event", "JobView", "Plan", "PlannerConfig", "plan"]


def plan(job: JobView, status: Any, pods: list[ObservedPod], now: float,
         cfg: PlannerConfig | None = None, stage: StageView | None = None) -> Plan:
    """What to do now for one job. Never raises on any status or pod state. `stage`: the data preparation's
    Jobs and pods as observed (none by default)."""
    stage = stage or StageView()
    d = Draft(job, status, pods, now, cfg or PlannerConfig())
    st = d.st
    # The size a started job runs at, kept when a resize is refused.
    recorded = as_count(as_dict(d.old_status.get("workers")).get("desired")) or 0
    current = recorded if st.start_time is not None else 0
    if st.phase in TERMINAL:
        finished(d, None)
    elif job.spec is not None and job.error is not None and job.size_only and current > 0:
        # `kubectl scale` to a size the batch does not split over: keep the size, say why.
        if d.old_status.get("observedGeneration") != job.generation:
            d.event("Warning", "ScaleRejected", f"{job.error}; staying at {current} workers")
        kept = job.spec.workers.model_copy(update={"nodes": current, "min_nodes": None, "max_nodes": None})
        _active(d, job.spec.model_copy(update={"workers": kept}), stage)
    elif job.spec is None or job.error is not None:
        fail(d, "InvalidSpec", job.error or "invalid spec")
    else:
        _active(d, job.spec, stage)
    return _finish(d)


def _active(d: Draft, spec: JobSpec, stage: StageView) -> None:
    """A job that should run: the policies in the order that matters. Success and permanent failures
    first (nothing else matters then), the deadline, suspend, the data preparation before any worker; then
    the size, the restarts counted, the pods to create, below-minNodes, the phase, and a stall (only once
    running)."""
    d.desired = desired = spec.workers.nodes
    st, low = d.st, spec.workers.elastic_range[0]
    p0 = d.pods.get(0)
    if p0 is not None and p0.phase == "Succeeded":
        return succeed(d, f"worker 0 exited 0 after {st.restarts} restart(s)")
    permanent = permanent_failure(d)
    if permanent is not None:
        return fail(d, permanent.reason, permanent.message)
    late = time_limits.past_deadline(d, spec)
    if late is not None:
        return fail(d, "DeadlineExceeded", late)
    if spec.run_policy.suspend:
        return suspend.suspend(d, stage)
    suspend.resume_if_suspended(d)
    gated = preparation.gate(d, spec, stage)
    if gated is not None:
        if gated.action == "failed":
            return fail(d, gated.reason, gated.message)
        if gated.action == "create":
            d.plan.prepare = gated.step
            if d.st.phase == PREPARING:  # the next step's Job (the first one's event is the phase's)
                d.event("Normal", "Preparing", gated.message)
        return d.set_phase(PREPARING, gated.reason, gated.message)

    if d.job.conflict is not None:
        return _hold(d, PENDING, NAME_CONFLICT, d.job.conflict)
    previous = as_count(as_dict(d.old_status.get("workers")).get("desired"))
    workers.resize(d, desired, desired if previous is None else previous)
    # A full restart under way has nothing new to count: its pods are all recorded as replaced.
    if not st.full_restart and not count_incidents(d, spec):
        return
    failure = d.job.create_failure
    if failure is not None and d.now < (retry := _retry_at(d, failure)):
        d.wake_at(retry)
        return _hold(d, RESTARTING if st.full_restart else PENDING, CREATE_FAILED,
                     f"the API server refused to create a worker pod ({failure.attempts} time(s), trying again "
                     f"{retry - failure.last_attempt:g}s after the last): {failure.message}"[:1000])
    workers.create(d, spec, desired)
    if not st.full_restart:
        elastic.check_below_min(d, spec, low)
    if d.phase in TERMINAL:
        return
    preparing = preparation.init_waiting(spec, stage)  # the worker's init container prepares the data
    _decide_phase(d, low, desired, preparing)
    if d.phase == RUNNING and not st.full_restart and stall.check_stall(d, spec):
        _decide_phase(d, low, desired, preparing)


NAME_CONFLICT, CREATE_FAILED = "NameConflict", "CreateFailed"


def _hold(d: Draft, phase: str, reason: str, message: str) -> None:
    """Nothing is created while the reason lasts; one Warning event per new message."""
    if d.st.phase == phase and (d.st.reason, d.st.message) != (reason, message) and not (
            reason == CREATE_FAILED and d.st.reason == CREATE_FAILED):  # (not one per countdown)
        d.event("Warning", reason, message)
    d.set_phase(phase, reason, message)


def _retry_at(d: Draft, failure: CreateFailure) -> float:
    return failure.last_attempt + min(d.cfg.max_backoff_seconds,
                                      d.cfg.create_backoff_seconds * 2 ** (failure.attempts - 1))


def _decide_phase(d: Draft, low: int, desired: int, preparing: preparation.Decision | None = None) -> None:
    st = d.st
    live = [p for p in d.pods.values() if p.index < desired and p.uid not in d.deleting]
    running = sum(1 for p in live if p.alive and p.phase in ("Running", "Succeeded"))
    alive = sum(1 for p in live if p.alive) + len(d.plan.create)
    if st.full_restart and st.resizing:
        d.set_phase(RESTARTING, RESIZING, f"re-forming at {desired} workers from the step checkpointed now")
    elif st.full_restart:
        d.set_phase(RESTARTING, "RestartingAllWorkers", f"restart {st.restarts}: relaunching all workers")
    elif running >= low:
        if d.phase != RUNNING:
            st.restart_time = d.now  # stall detection counts from here
        note = f"; replacing {len(st.replacing)}" if st.replacing else ""
        d.set_phase(RUNNING, "WorkersRunning", f"{running}/{desired} workers running{note}")
    elif st.replacing:
        d.set_phase(RESTARTING, "ReplacingWorkers",
                    f"restart {st.restarts}: {alive}/{desired} workers alive, minimum {low}")
    else:
        waiting = next((f"; {p.name}: {p.waiting}" for p in live if p.waiting), "")
        if preparing is not None:  # rather than Pending
            d.set_phase(PREPARING, preparing.reason, preparing.message)
        else:
            d.set_phase(PENDING, "WorkersStarting", f"{running}/{desired} workers running{waiting}"[:1000])


def _finish(d: Draft) -> Plan:
    """The new status (as a merge patch over the fields the planner owns) and when to look again."""
    st, job = d.st, d.job
    desired = d.desired if d.desired is not None else (job.spec.workers.nodes if job.spec else 0)
    in_range = [p for p in d.pods.values() if p.index < max(desired, 1) and p.uid not in d.deleting]
    if d.phase in TERMINAL or d.phase == SUSPENDED:
        in_range = [p for p in in_range if not p.terminating and p.uid not in d.deleting]
    worker_counts = {
        "desired": desired,
        "active": sum(1 for p in in_range if p.alive and p.phase != "Succeeded") + len(d.plan.create),
        "ready": sum(1 for p in in_range if p.ready),
        "failed": sum(1 for p in d.pods.values() if p.ended_badly),
    }
    tracking = {
        "launched": st.launched,
        "replacing": dict(sorted(st.replacing.items(), key=lambda kv: int(kv[0]))),
        "lastFailureTime": iso_precise(st.last_failure) if st.last_failure is not None else None,
        "belowMinSince": iso_precise(st.below_min_since) if st.below_min_since is not None else None,
        "restartTime": iso_precise(st.restart_time) if st.restart_time is not None else None,
        "fullRestart": st.full_restart,
        "resizing": st.resizing,
    }
    new: dict[str, Any] = {
        "phase": d.phase, "reason": d.reason, "message": d.message,
        "conditions": update_conditions(st.conditions, d.phase, d.reason, d.message, d.now) + (
            [stall.progress_condition(d, job.spec)] if d.phase == RUNNING and job.spec is not None else []),
        "workers": worker_counts, "restarts": st.restarts,
        "startTime": iso_precise(st.start_time) if st.start_time is not None else None,
        "completionTime": iso_precise(st.completion_time) if st.completion_time is not None else None,
        "observedGeneration": job.generation, "selector": selector(job.ref),
        "tracking": {k: v for k, v in tracking.items() if v is not None},
    }
    new = {k: v for k, v in new.items() if v is not None}
    old = {k: d.old_status[k] for k in OWNED if k in d.old_status}
    d.plan.status_patch = merge_patch(old, new)
    p0 = d.pods.get(0)
    # An ended worker 0 (succeeded, stopped by a suspend or deletion, failed): its final report, only forward,
    # at every pass while the pod is observed (one gone before a pass saw it: controller.Runtime.keep_report).
    if p0 is not None and p0.report:
        d.plan.status_patch.update(final_report_patch(d.old_status, p0.report, d.now))
    d.plan.names = {i: name for i in d.plan.create if (name := d.name_for(i)) != pod_name(job.ref, i)}
    d.plan.phase = d.phase
    d.plan.requeue_after = min(d.requeue) if d.requeue else None
    return d.plan
