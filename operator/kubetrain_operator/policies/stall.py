"""runPolicy.stallTimeoutSeconds: no new training step (status.progress.stepTime) for that long, while
running, restarts all workers; a hung collective is the usual cause.

A stall is concluded only from progress read: worker 0's /progress answered after the deadline and showed no
newer step. Progress that cannot be read (metrics.port 0, a NetworkPolicy, a changed port) is unknown, not a
stall: the condition ProgressKnown says so, and the job is left alone.
"""

from __future__ import annotations

from typing import Any

from kubetrain_api.manifest import JobSpec

from ..coerce import as_dict
from ..draft import Draft
from ..timeutil import iso
from .restart import count, restart_all

PROGRESS_KNOWN = "ProgressKnown"


def check_stall(d: Draft, spec: JobSpec) -> bool:
    """True when the job stalled and all its workers restart now (the caller decides the phase again)."""
    timeout = spec.run_policy.stall_timeout_seconds
    st = d.st
    if not timeout:
        return False
    # The clock runs from the last step, or the (re)launch when there was none since.
    since = max(t for t in (st.step_time, st.restart_time, st.start_time, 0.0) if t is not None)
    if d.now - since < timeout:
        d.wake_at(since + timeout)
        return False
    read = d.job.progress_read
    if read is None or read < since + timeout:  # no answer since the deadline: unknown, not stalled
        return False
    step = as_dict(d.old_status.get("progress")).get("step")
    message = f"no training step for {timeout}s (stuck at step {step}); a hung collective is the usual cause"
    if count(d, 1, "Stalled", message):
        restart_all(d, message + "; restarting all workers")
        return True
    return False


def progress_condition(d: Draft, spec: JobSpec) -> dict[str, Any]:
    """ProgressKnown, while running: True while a worker answers /progress; False when none has for
    PlannerConfig.progress_unknown_seconds since the (re)launch or the last answer, or metrics.port is 0."""
    st, read = d.st, d.job.progress_read
    started = max(t for t in (st.restart_time, st.start_time, 0.0) if t is not None)
    if not spec.metrics.port:
        status, reason, message = "False", "MetricsDisabled", "metrics.port is 0: no progress is read and no stall " \
                                                               "is detected"
    elif read is not None and d.now - read < d.cfg.progress_unknown_seconds:
        status, reason, message = "True", "ProgressRead", "worker 0 answers /progress"
    elif d.now - max(started, read or 0.0) < d.cfg.progress_unknown_seconds:
        d.wake_at(max(started, read or 0.0) + d.cfg.progress_unknown_seconds)
        status, reason, message = "Unknown", "WaitingForProgress", "no /progress answer yet"
    else:
        status, reason, message = "False", "ProgressUnreadable", (
            f"no worker has answered /progress on port {spec.metrics.port} for {d.cfg.progress_unknown_seconds:g}s "
            f"(a NetworkPolicy, another port?): stall detection is paused until one does")
    old = next((c for c in st.conditions if c.get("type") == PROGRESS_KNOWN), None)
    changed = old is None or old.get("status") != status
    return {"type": PROGRESS_KNOWN, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": iso(d.now) if changed else old.get("lastTransitionTime")}  # type: ignore[union-attr]
