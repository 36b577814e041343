"""runPolicy.suspend: true stops every worker (each checkpoints on SIGTERM); false again relaunches them."""

from __future__ import annotations

from kubetrain_api.status import SUSPENDED

from ..draft import Draft


def suspend(d: Draft) -> None:
    for pod in d.pods.values():
        d.delete(pod)
    st = d.st
    # The pods going away stay recorded as handled until the relaunch, so none is counted later.
    st.replacing = {str(p.index): p.uid for p in d.pods.values()}
    st.launched, st.below_min_since, st.full_restart = 0, None, False
    left = sum(1 for p in d.pods.values() if p.alive or p.terminating)
    d.set_phase(SUSPENDED, "Suspended", "runPolicy.suspend is true: workers stopped (each checkpoints "
                                        "on SIGTERM)" + (f"; {left} terminating" if left else ""))


def resume_if_suspended(d: Draft) -> None:
    """A suspended job's spec says run again: say so; the workers relaunch like a first launch
    (bookkeeping launched is 0)."""
    if d.st.phase == SUSPENDED:
        d.event("Normal", "Resumed", "runPolicy.suspend is false: relaunching the workers")
        d.st.start_time = None  # the deadline counts from the relaunch, as for Kubernetes Jobs
