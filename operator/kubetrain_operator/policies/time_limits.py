"""The job's time limits: runPolicy.activeDeadlineSeconds while it runs, ttlSecondsAfterFinished once done."""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec
from kubetrain_api.status import SUSPENDED

from ..draft import Draft


def past_deadline(d: Draft, spec: JobSpec) -> str | None:
    """Why the job must fail now, past activeDeadlineSeconds from its (re)launch; before that, a wake-up at
    the deadline. A suspended job's clock is stopped: a resume restarts it, as for Kubernetes Jobs."""
    deadline, st = spec.run_policy.active_deadline_seconds, d.st
    if not deadline or st.start_time is None or st.phase == SUSPENDED:
        return None
    if d.now >= st.start_time + deadline:
        return f"running longer than runPolicy.activeDeadlineSeconds ({deadline}s)"
    d.wake_at(st.start_time + deadline)
    return None


def expire_after_ttl(d: Draft) -> None:
    """A finished job is deleted ttlSecondsAfterFinished after its completion (a wake-up until then)."""
    spec = d.job.spec
    ttl = spec.run_policy.ttl_seconds_after_finished if spec else None
    done = d.st.completion_time
    if ttl is not None and done is not None:
        if d.now >= done + ttl:
            d.plan.delete_job = True
        else:
            d.wake_at(done + ttl)
