"""Elastic jobs below workers.minNodes: fewer alive than the minimum for longer than the grace period
(PlannerConfig.below_min_grace_seconds) restarts all workers."""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from .restart import count, restart_all


def check_below_min(d: Draft, spec: JobSpec, low: int) -> None:
    """Fewer than minNodes alive (e.g. a worker stuck terminating on a lost node) for longer than the
    grace period: restart all, force-deleting pods stuck terminating. Waiting out a backoff is exempt."""
    st = d.st
    alive = len(d.plan.create) + sum(1 for p in d.pods.values() if p.alive and p.index < spec.workers.nodes
                                     and p.uid not in d.deleting)
    backing_off = any(
        int(k) not in d.plan.create and (int(k) not in d.pods or d.pods[int(k)].uid in d.deleting)
        for k in st.replacing)
    if st.launched == 0 or alive >= low or backing_off:
        st.below_min_since = None
        return
    if st.below_min_since is None:
        st.below_min_since = d.now
    grace = d.cfg.below_min_grace_seconds
    if d.now - st.below_min_since < grace:
        return d.wake_at(st.below_min_since + grace)
    message = f"only {alive} of minimum {low} workers alive for {grace:g}s"
    if count(d, 1, "BelowMinNodes", message):
        restart_all(d, message + "; restarting all workers", force_older_than=d.now - grace)
