"""Which worker pods to create and delete for the job's size: scale down, the first launch (or a resume),
the relaunch together after a full restart, replacements after the backoff, scale up."""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from .restart import backoff_seconds


def scale_down(d: Draft, desired: int, previous: int) -> None:
    """Pods beyond the desired size go (gracefully: they checkpoint first)."""
    st = d.st
    for pod in d.pods.values():
        if pod.index >= desired:
            d.delete(pod)
    st.replacing = {k: v for k, v in st.replacing.items() if int(k) < desired}
    if st.launched and previous != desired:
        d.event("Normal", "Scaled", f"workers {previous} → {desired}")
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
        for pod in d.pods.values():
            if pod.uid in old:
                d.delete(pod)
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


def launch(d: Draft, missing: list[int]) -> None:
    """A (re)launch of the whole group: the ConfigMap is written before the pods; the first one starts
    the job's clock and shows the spec's warnings."""
    st = d.st
    d.plan.create, d.plan.launch = missing, True
    st.full_restart, st.replacing, st.restart_time = False, {}, d.now
    if st.start_time is None:
        st.start_time = d.now
        for warning in d.job.warnings:
            d.event("Warning", "SpecWarning", warning)
