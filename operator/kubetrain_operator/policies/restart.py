"""Restart and failure policy: which pod ends count as restarts, runPolicy.maxRestarts, the exponential
backoff, and full restarts.

A worker that fails, is deleted or disappears is recreated (after the backoff) while the others keep
running (torchrun re-rendezvous), and counts one restart. Worker 0 hosts the rendezvous, so its loss
restarts all workers (one restart), as do a stall and staying below minNodes for longer than the grace
period. Each counted pod's uid is recorded (tracking.replacing) before anything is deleted, so no failure
is counted twice, whenever the operator stops. An exit restarting cannot help (classify) fails the job.
"""

from __future__ import annotations

from kubetrain_api.manifest import JobSpec

from ..draft import Draft
from ..pods import Outcome, classify
from ..render import pod_name
from .completion import fail


def backoff_seconds(base: float, restarts: int, cap: float) -> float:
    return float(min(cap, base * 2 ** max(0, restarts - 1)))


def permanent_failure(d: Draft) -> Outcome | None:
    """The first failed pod, not yet handled, whose exit restarting cannot fix (a config error, NaN loss)."""
    for pod in d.pods.values():
        if pod.phase == "Failed" and d.st.replacing.get(str(pod.index)) != pod.uid:
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
    """Find the workers that ended badly or disappeared since the last pass and count them (one restart
    each, or one for all when worker 0 is among them); False when that failed the job."""
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
    full = any(i == 0 for i, _, _ in incidents)
    first = incidents[0][2]
    if not count(d, 1 if full else len(incidents), first.reason, first.message):
        return False
    backoff = backoff_seconds(spec.run_policy.restart_backoff_seconds, st.restarts, d.cfg.max_backoff_seconds)
    for i, uid, outcome in incidents:
        st.replacing[str(i)] = uid
        d.event("Warning", f"Worker{outcome.reason}" if outcome.reason != "Lost" else "WorkerLost",
                f"{outcome.message}; restart {st.restarts} of {spec.run_policy.max_restarts}, "
                f"{'all workers' if full else 'recreating it'} in {backoff:g}s")
        pod = d.pods.get(i)
        if pod is not None and pod.phase == "Failed":
            d.delete(pod)
    if full:
        restart_all(d, "worker 0 (the rendezvous host) ended: " + first.message)
    return True


def restart_all(d: Draft, why: str, force_older_than: float | None = None) -> None:
    """Stop every worker to relaunch them together (policies/workers.py waits until all are gone);
    force_older_than: pods whose deletion was asked before then are force-deleted (stuck on a lost node)."""
    st = d.st
    st.full_restart, st.below_min_since, st.restart_time = True, None, d.now
    d.plan.create, d.plan.launch = [], False
    for pod in d.pods.values():
        st.replacing[str(pod.index)] = pod.uid
        stuck = (force_older_than is not None and pod.terminating and pod.deletion_time is not None
                 and pod.deletion_time <= force_older_than)
        d.delete(pod, force=stuck)
    d.event("Warning", "RestartingAllWorkers", why)
