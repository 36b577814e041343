"""How a job ends: Succeeded when worker 0 exits 0, Failed with a reason; then runPolicy.cleanPodPolicy
for its pods and ttlSecondsAfterFinished for the job itself."""

from __future__ import annotations

from kubetrain_api.status import FAILED, SUCCEEDED

from ..draft import Draft
from .time_limits import expire_after_ttl


def succeed(d: Draft, message: str) -> None:
    d.set_phase(SUCCEEDED, "Completed", message)
    d.st.completion_time = d.now
    finished(d, "Completed")


def fail(d: Draft, reason: str, message: str) -> None:
    d.plan.create, d.plan.launch = [], False
    d.set_phase(FAILED, reason, message)
    d.st.completion_time = d.now
    finished(d, reason)


def finished(d: Draft, new_reason: str | None) -> None:
    """A finished job (now, or on an earlier pass: new_reason None): no restart bookkeeping, the pods
    cleanPodPolicy names go, and the job itself once its TTL is over."""
    spec = d.job.spec
    d.st.replacing, d.st.below_min_since, d.st.full_restart = {}, None, False
    policy = spec.run_policy.clean_pod_policy if spec else "Running"
    if (new_reason or d.reason) == "DeadlineExceeded" and policy == "None":
        policy = "Running"  # past its deadline a job's workers always stop
    for pod in d.pods.values():
        if policy == "All" or (policy == "Running" and pod.phase in ("Pending", "Running", "Unknown")):
            d.delete(pod)
    expire_after_ttl(d)
