"""Which worker pods to create and delete for the job's size: a resize, the first launch (or a resume),
the relaunch together after a full restart or a resize, replacements after the backoff."""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from ..render import grace_seconds
from .restart import backoff_seconds, stop_all


def resize(d: Draft, desired: int, previous: int) -> None:
    """A launched group whose size changed (kubectl scale, spec.workers.nodes) stops every worker gracefully:
    SIGTERM makes all ranks agree on a step and commit its checkpoint (the trainer's preempt, as for a
    suspend), and create() relaunches them at the new size once all are gone, so no completed step is redone.
    Not a restart: nothing failed. A group in the middle of a restart relaunches at the new size anyway."""
    st = d.st
    if st.launched and previous != desired:
        how = "re-forming at the new size after a restart" if st.full_restart and not st.resizing else \
            "checkpointing the current step, then re-forming the group"
        d.event("Normal", "Scaled", f"workers {previous} → {desired}: {how}")
        if not st.full_restart:
            stop_all(d)
            st.resizing = True
    for pod in d.pods.values():
        if pod.index >= desired:
            d.delete(pod)
    if not st.full_restart:  # (a restart waits for every old pod, the ones beyond the size included)
        st.replacing = {k: v for k, v in st.replacing.items() if int(k) < desired}
    st.launched = min(st.launched, desired)


def create(d: Draft, spec: JobSpec, desired: int) -> None:
    """The pods missing now, by the case the job is in (see the module's docstring); bookkeeping
    `launched` ends as the count of workers launched, which later losses are counted against."""
    st = d.st
    present = {p.index for p in d.pods.values()}
    missing = [i for i in range(desired) if i not in present]
    backoff_until = None
    if st.last_failure is not None and st.restarts:
        backoff_until = st.last_failure + backoff_seconds(
            spec.run_policy.restart_backoff_seconds, st.restarts, d.cfg.max_backoff_seconds)
    backed_off = backoff_until is None or d.now >= backoff_until
    if st.full_restart:  # relaunch together once every old pod is gone (they checkpoint on SIGTERM)
        old = set(st.replacing.values())
        overdue = _stop_overdue(d, spec)
        for pod in d.pods.values():
            if pod.uid in old:
                d.delete(pod, force=overdue and pod.terminating)
        if overdue:
            d.event("Warning", "ForceDeleted", "workers still terminating long after their grace period "
                    "(a lost node?): force-deleted to relaunch")
        elif st.restart_time is not None:
            d.wake_at(st.restart_time + _overdue_seconds(d, spec))
        if any(p.uid in old for p in d.pods.values()):
            return
        if not backed_off:
            return d.wake_at(backoff_until)
        launch(d, missing)
    elif st.launched == 0:  # first launch or resume: adopt live pods, wait for terminating ones
        if any(p.terminating for p in d.pods.values()):
            return
        launch(d, missing)
    else:
        for i in missing:
            if str(i) not in st.replacing or backed_off:  # scale-up needs no backoff
                d.plan.create.append(i)
            else:
                d.wake_at(backoff_until)
        if backoff_until is not None and not backed_off and st.replacing:
            d.wake_at(backoff_until)  # a replaced pod may still be going away
        if missing and not d.plan.create:
            return
        # Scaled up over a worker still leaving from a scale-down: launched stops below it.
        leaving = [i for i in range(st.launched, desired) if i in d.pods and d.pods[i].terminating]
        if leaving:
            st.launched = min(leaving)
            return
    st.launched = desired


def _overdue_seconds(d: Draft, spec: JobSpec) -> float:
    """How long after the stop a pod still terminating is stuck (its node lost, say): the grace asked for (a
    failure's short one, or the pods' own for a resize's checkpoint), then PlannerConfig's grace."""
    asked = grace_seconds(spec) if d.st.resizing else d.cfg.failed_group_grace_seconds
    return asked + d.cfg.below_min_grace_seconds


def _stop_overdue(d: Draft, spec: JobSpec) -> bool:
    old = set(d.st.replacing.values())
    stuck = any(p.uid in old and p.terminating for p in d.pods.values())
    return stuck and d.st.restart_time is not None and d.now >= d.st.restart_time + _overdue_seconds(d, spec)


def launch(d: Draft, missing: list[int]) -> None:
    """A (re)launch of the whole group: the ConfigMap is written before the pods; the first one starts
    the job's clock and shows the spec's warnings."""
    st = d.st
    d.plan.create, d.plan.launch = missing, True
    st.full_restart, st.resizing, st.replacing, st.restart_time = False, False, {}, d.now
    if st.start_time is None:
        st.start_time = d.now
        for warning in d.job.warnings:
            d.event("Warning", "SpecWarning", warning)
