"""Restart and failure policy: which pod ends count as restarts, runPolicy.maxRestarts, the exponential
backoff, and the restart itself.

A worker that fails, is deleted or disappears restarts the whole group, counted once: every pod runs one
torchrun round (`--max-restarts=0`, render.torchrun_args), so the survivors cannot go on without it; they
are stopped with a short grace period (PlannerConfig.failed_group_grace_seconds: they cannot commit a
checkpoint without the lost rank's shards) and all relaunch together after the backoff, resuming from the
newest committed checkpoint. Whatever else ends before the relaunch (the survivors' own exits, as their
collectives fail) is part of the same restart. A stall and staying below minNodes for longer than the grace
period restart all the same way. Each counted pod's uid is recorded (tracking.replacing) before anything is
deleted, so no failure is counted twice, whenever the operator stops. An exit restarting cannot help
(classify) fails the job at once, whichever worker it is in, even one already stopped for a restart.
"""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from ..pods import Outcome, classify
from ..render import pod_name
from .completion import fail

# What an incident's own message says, first: the survivors of a lost peer exit with a plain error.
_CAUSE_ORDER = ("Lost", "Deleted", "OOMKilled", "Signal", "Preempted")


def backoff_seconds(base: float, restarts: int, cap: float) -> float:
    return float(min(cap, base * 2 ** max(0, restarts - 1)))


def permanent_failure(d: Draft) -> Outcome | None:
    """The first failed pod whose exit restarting cannot fix (a config error, NaN loss), also one stopped for a
    restart under way (a deterministic error seen after another worker's exit stays deterministic)."""
    for pod in d.owned:
        if pod.phase == "Failed":
            outcome = classify(pod)
            if not outcome.retryable:
                return outcome
    return None


def count(d: Draft, n: int, reason: str, message: str) -> bool:
    """Count `n` restarts; False (and the job failed) when that goes past runPolicy.maxRestarts."""
    limit = d.job.spec.run_policy.max_restarts if d.job.spec else 0
    if d.st.restarts + n > limit:
        fail(d, "MaxRestartsExceeded", f"{message}; restart limit reached (runPolicy.maxRestarts: {limit})")
        return False
    d.st.restarts += n
    d.st.last_failure = d.now
    d.plan.restarts.extend([reason] * n)
    return True


def count_incidents(d: Draft, spec: JobSpec) -> bool:
    """Find the workers that ended badly or disappeared since the last pass and restart the group for
    them: one restart however many (one failure takes the group down); False when that failed the job."""
    st, desired = d.st, spec.workers.nodes
    incidents: list[tuple[int, str, Outcome]] = []
    for i in range(desired):
        pod, handled = d.pods.get(i), st.replacing.get(str(i))
        if pod is None:
            if i < st.launched and handled is None:
                name = pod_name(d.job.ref, i)
                incidents.append((i, "", Outcome("Lost", True, f"{name} disappeared (force-deleted?)")))
        elif pod.ended_badly and handled != pod.uid and (pod.phase == "Failed" or i < st.launched):
            incidents.append((i, pod.uid, classify(pod)))
        elif pod.alive and handled is not None and handled != pod.uid:
            del st.replacing[str(i)]  # its replacement is up
        elif pod.phase == "Failed" and handled == pod.uid:
            d.delete(pod)  # counted before; the deletion may not have happened
    if not incidents:
        return True
    cause = min(incidents, key=lambda inc: (_CAUSE_ORDER.index(inc[2].reason) if inc[2].reason in _CAUSE_ORDER
                                            else len(_CAUSE_ORDER), inc[0]))[2]
    if not count(d, 1, cause.reason, cause.message):
        return False
    backoff = backoff_seconds(spec.run_policy.restart_backoff_seconds, st.restarts, d.cfg.max_backoff_seconds)
    for i, uid, outcome in incidents:
        st.replacing[str(i)] = uid
        d.event("Warning", f"Worker{outcome.reason}" if outcome.reason != "Lost" else "WorkerLost",
                f"{outcome.message}; restart {st.restarts} of {spec.run_policy.max_restarts}, "
                f"all workers in {backoff:g}s")
    # A worker being deleted gracefully (a drain, an eviction) or stopped after its checkpoint is taking the
    # group's SIGTERM checkpoint with it: the others get their own grace period too, so that it can commit
    # (all ranks write their shards). After a failure they cannot, and get the short one.
    graceful = all(outcome.reason in ("Deleted", "Preempted") for _, _, outcome in incidents)
    restart_all(d, f"{cause.message}: restarting all workers",
                grace_seconds=None if graceful else d.cfg.failed_group_grace_seconds)
    return True


def restart_all(d: Draft, why: str, force_older_than: float | None = None,
                grace_seconds: int | None = None) -> None:
    """Stop every worker to relaunch them together, and say why."""
    stop_all(d, force_older_than, grace_seconds)
    d.event("Warning", "RestartingAllWorkers", why)


def stop_all(d: Draft, force_older_than: float | None = None, grace_seconds: int | None = None) -> None:
    """Delete every worker to relaunch them together (policies/workers.py waits until all are gone);
    force_older_than: pods whose deletion was asked before then are force-deleted (stuck on a lost node);
    grace_seconds: instead of the pods' own grace period (None: theirs, time for a SIGTERM checkpoint)."""
    st = d.st
    st.full_restart, st.below_min_since, st.restart_time = True, None, d.now
    d.plan.create, d.plan.launch = [], False
    for pod in d.pods.values():
        st.replacing[str(pod.index)] = pod.uid
        stuck = (force_older_than is not None and pod.terminating and pod.deletion_time is not None
                 and pod.deletion_time <= force_older_than)
        d.delete(pod, force=stuck, grace_seconds=None if pod.phase == "Failed" else grace_seconds)
