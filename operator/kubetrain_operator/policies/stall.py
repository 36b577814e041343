"""runPolicy.stallTimeoutSeconds: no new training step (status.progress.stepTime) for that long, while
running, restarts all workers; a hung collective is the usual cause."""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..coerce import as_dict
from ..draft import Draft
from .restart import count, restart_all


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
    step = as_dict(d.old_status.get("progress")).get("step")
    message = f"no training step for {timeout}s (stuck at step {step}); a hung collective is the usual cause"
    if count(d, 1, "Stalled", message):
        restart_all(d, message + "; restarting all workers")
        return True
    return False
