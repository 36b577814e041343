"""runPolicy.suspend: true stops every worker (each checkpoints on SIGTERM); false again relaunches them."""

from __future__ import annotations

from kubetrain_api.status import SUSPENDED

from ..draft import Draft
from ..preparation import StageView


def suspend(d: Draft, stage: StageView) -> None:
    """Stop the workers, and a data preparation under way (its batch Jobs, with their pods: the stage starts
    again at the resume, reusing what was prepared when its inputs are unchanged)."""
    for pod in d.pods.values():
        d.delete(pod)
    d.plan.stop_stage = [j.name for j in stage.jobs if not j.complete and not j.failed and not j.terminating]
    st = d.st
    # The pods going away stay recorded as handled until the relaunch, so none is counted later.
    st.replacing = {str(p.index): p.uid for p in d.pods.values()}
    st.launched, st.below_min_since, st.full_restart = 0, None, False
    left = sum(1 for p in d.pods.values() if p.alive or p.terminating)
    stopped = f"; data preparation stopped ({', '.join(d.plan.stop_stage)})" if d.plan.stop_stage else ""
    d.set_phase(SUSPENDED, "Suspended", "runPolicy.suspend is true: workers stopped (each checkpoints "
                                        "on SIGTERM)" + (f"; {left} terminating" if left else "") + stopped)


def resume_if_suspended(d: Draft) -> None:
    """A suspended job's spec says run again: say so; the workers relaunch like a first launch
    (bookkeeping launched is 0)."""
    if d.st.phase == SUSPENDED:
        d.event("Normal", "Resumed", "runPolicy.suspend is false: relaunching the workers")
        d.st.start_time = None  # the deadline counts from the relaunch, as for Kubernetes Jobs
