"""Which worker pods to create and delete for the job's size: a resize, the first launch (or a resume),
the relaunch together after a full restart or a resize, replacements after the backoff."""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from ..pods import ObservedPod
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
    `launched` ends as the count of workers launched, which later losses are counted against. A pod held by a
    finalizer after its containers ended counts as gone (its replacement gets another name); an earlier job's
    pods of the same names are deleted and waited for."""
    st = d.st
    if _stale_pods_in_the_way(d):
        return
    present = {p.index for p in d.pods.values() if not d.held(p)}
    missing = [i for i in range(desired) if i not in present]
    backoff_until = None
    if st.last_failure is not None and st.restarts:
        backoff_until = st.last_failure + backoff_seconds(
            spec.run_policy.restart_backoff_seconds, st.restarts, d.cfg.max_backoff_seconds)
    backed_off = backoff_until is None or d.now >= backoff_until
    if st.full_restart:  # relaunch together once every old pod is gone (they checkpoint on SIGTERM)
        old = set(st.replacing.values())
        overdue = _stop_overdue(d)
        for pod in d.pods.values():
            if pod.uid in old and not d.held(pod):
                d.delete(pod, force=overdue and pod.terminating and not _forced(pod))
        if overdue and any(_overdue_at(d, p) is not None and not _forced(p) for p in d.pods.values()):
            d.event("Warning", "ForceDeleted", "workers still terminating long after their grace period "
                    "(a lost node?): force-deleted to relaunch")
        elif (due := _next_overdue(d)) is not None:
            d.wake_at(due)
        if any(p.uid in old and not d.held(p) for p in d.pods.values()):
            return
        if not backed_off:
            return d.wake_at(backoff_until)
        launch(d, missing)
    elif st.launched == 0:  # first launch or resume: adopt live pods, wait for terminating ones
        if any(p.terminating and not d.held(p) for p in d.pods.values()):
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
        leaving = [i for i in range(st.launched, desired) if i in d.pods and d.pods[i].terminating
                   and not d.held(d.pods[i])]
        if leaving:
            st.launched = min(leaving)
            return
    st.launched = desired


def _stale_pods_in_the_way(d: Draft) -> bool:
    """An earlier job of this name left pods (deleted with --cascade=orphan, or not yet collected): they are not
    this job's, and must not be taken for its workers (their exits, their checkpoints). Delete them, and create
    nothing until they are gone; held ones (a finalizer) only keep their names."""
    waiting = [p for p in d.stale if not d.held(p)]
    if not waiting:
        return False
    if any(not p.terminating for p in waiting):
        d.event("Warning", "StalePods", f"{', '.join(p.name for p in waiting)}: left by an earlier job of this name "
                f"(not this job's): deleting them before the workers start")
    for p in waiting:
        d.delete(p, grace_seconds=d.cfg.failed_group_grace_seconds)
    return True


def _overdue_at(d: Draft, pod: ObservedPod) -> float | None:
    """When a pod of the group being stopped is stuck terminating, PlannerConfig.below_min_grace_seconds after
    its grace period should have ended. A pod still ready (its kubelet reports it) has its own grace period (the
    deletionTimestamp): a drain's or a resize's long one is honoured, so its SIGTERM checkpoint is not cut
    short. One that is not (its node lost, say) has at most a failure's short one from the restart."""
    if not pod.terminating or d.held(pod) or pod.uid not in set(d.st.replacing.values()):
        return None
    short = d.st.restart_time + d.cfg.failed_group_grace_seconds if d.st.restart_time is not None else None
    own = pod.deletion_deadline
    if own is not None and short is not None and not pod.ready:
        own = min(own, short)
    end = own if own is not None else short
    return None if end is None else end + d.cfg.below_min_grace_seconds


def _forced(pod: ObservedPod) -> bool:
    """Already deleted with grace 0 (by us, or kubectl --force): a second force delete changes nothing."""
    return pod.deletion_deadline is not None and pod.deletion_deadline == pod.deletion_time


def _next_overdue(d: Draft) -> float | None:
    return min((t for p in d.pods.values() if (t := _overdue_at(d, p)) is not None), default=None)


def _stop_overdue(d: Draft) -> bool:
    return any((t := _overdue_at(d, p)) is not None and d.now >= t for p in d.pods.values())


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
