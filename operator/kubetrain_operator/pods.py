"""What the operator observes of a worker pod, and how a pod's end is classified (pure functions)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from kubetrain_api.contract import parse_termination_message
from kubetrain_api.exit_codes import EXIT_CONFIG, EXIT_NON_FINITE, EXIT_PREEMPTED, EXIT_STORAGE_UNAVAILABLE

from .coerce import as_dict, as_int, as_list, as_str, is_digits
from .ownership import Owner, controller_of, managed_by_us
from .render import CONTAINER, LABEL_INDEX, LABEL_JOB
from .timeutil import parse_time

ALIVE_PHASES = ("Pending", "Running", "Unknown")


@dataclass(frozen=True)
class ObservedPod:
    name: str
    index: int
    uid: str
    phase: str = "Pending"
    terminating: bool = False
    deletion_time: float | None = None  # when its deletion was asked for
    deletion_deadline: float | None = None  # when its grace period ends (deletionTimestamp)
    finished_at: float | None = None  # when its container ended (terminated.finishedAt)
    exit_code: int | None = None
    container_reason: str | None = None  # terminated.reason: Error, OOMKilled, Completed...
    termination_message: str | None = None
    pod_reason: str | None = None  # status.reason: Evicted, NodeLost, Shutdown...
    pod_message: str | None = None
    ready: bool = False
    ip: str | None = None
    waiting: str | None = None  # why it is not running yet: unschedulable, image pull...
    # The final report at the head of an ended container's termination message (kubetrain_api.contract).
    report: dict[str, Any] | None = field(default=None, hash=False)
    owner: Owner | None = None  # the controller ownerReference: whose pod it is (ownership.py)
    managed: bool = False  # it carries our labels (an earlier job's pod of this name may)

    @property
    def alive(self) -> bool:
        """Counts toward the job's size: pending, running or finished well, and not going away."""
        return not self.terminating and self.phase in (*ALIVE_PHASES, "Succeeded")

    @property
    def ended_while_terminating(self) -> bool:
        """Deleted, and its containers have ended: its kubelet removes it next, unless a finalizer holds it
        (draft.Draft.held)."""
        return self.terminating and self.phase in ("Failed", "Succeeded")

    @property
    def expected_gone_at(self) -> float | None:
        """Since when its kubelet should have removed this deleted pod: its containers' end (or its deletion,
        if that is not known), or — not ready, and its grace period over without an end — its deadline: a
        lost node's pod, whose phase nobody changes any more. Still there some time after that, a finalizer
        holds it (draft.Draft.held). None: not deleted, or its kubelet may still be at work."""
        if not self.terminating:
            return None
        if self.ended_while_terminating:
            return self.finished_at if self.finished_at is not None else self.deletion_time
        if not self.ready:
            return self.deletion_deadline
        return None

    @property
    def ended_badly(self) -> bool:
        return self.phase == "Failed" or (self.terminating and self.phase != "Succeeded")


def replica_index(labels: Any) -> int | None:
    raw = labels.get(LABEL_INDEX) if isinstance(labels, dict) else None
    return int(raw) if is_digits(raw) else None


def observe_pod(body: Any) -> ObservedPod | None:
    """The facts the planner needs from a pod body; None when it is not a worker pod we can place."""
    if not isinstance(body, dict):
        return None
    meta, status = as_dict(body.get("metadata")), as_dict(body.get("status"))
    index = replica_index(meta.get("labels"))
    name = as_str(meta.get("name"))
    if index is None or name is None:
        return None
    # A real API server always sets a uid; without one, name + creation time still tell pods apart.
    uid = as_str(meta.get("uid")) or f"{name}@{meta.get('creationTimestamp') or ''}"
    exit_code = reason = message = waiting = None
    finished_at: float | None = None
    report: dict[str, Any] | None = None
    for cs in as_list(status.get("containerStatuses")):
        if not isinstance(cs, dict) or cs.get("name") != CONTAINER:
            continue
        state = as_dict(cs.get("state"))
        term = as_dict(state.get("terminated"))
        if term:
            exit_code, reason = as_int(term.get("exitCode")), as_str(term.get("reason"))
            message, report = parse_termination_message(as_str(term.get("message")))
            finished_at = parse_time(term.get("finishedAt"))
        wait = as_dict(state.get("waiting"))
        if wait and as_str(wait.get("reason")) not in (None, "ContainerCreating", "PodInitializing"):
            waiting = f"{wait.get('reason')}: {wait.get('message') or ''}".rstrip(": ")
    ready = False
    for cond in as_list(status.get("conditions")):
        if not isinstance(cond, dict):
            continue
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and waiting is None:
            waiting = f"{cond.get('reason') or 'Unschedulable'}: {cond.get('message') or ''}".rstrip(": ")
    deletion = meta.get("deletionTimestamp")
    # deletionTimestamp is when the grace period ends (the request's time + deletionGracePeriodSeconds):
    # the deletion was asked for that many seconds before it.
    deadline = deletion_time = parse_time(deletion)
    if deletion_time is not None:
        deletion_time -= as_int(meta.get("deletionGracePeriodSeconds")) or 0
    phase = as_str(status.get("phase")) or "Pending"
    return ObservedPod(
        name=name, index=index, uid=uid, phase=phase,
        terminating=deletion is not None, deletion_time=deletion_time, deletion_deadline=deadline,
        finished_at=finished_at,
        exit_code=exit_code, container_reason=reason, termination_message=message,
        pod_reason=as_str(status.get("reason")), pod_message=as_str(status.get("message")),
        ready=ready and phase == "Running", ip=as_str(status.get("podIP")), waiting=waiting, report=report,
        owner=controller_of(meta),
        managed=managed_by_us(meta, as_str(as_dict(meta.get("labels")).get(LABEL_JOB)) or ""),
    )


@dataclass(frozen=True)
class Outcome:
    reason: str  # CamelCase, used in events, conditions and the restarts-by-reason metric
    retryable: bool
    message: str


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return f"signal {code - 128}"


def classify(pod: ObservedPod) -> Outcome:
    """Why a worker pod ended (or is going away), and whether restarting it can help."""
    code = pod.exit_code
    detail = f": {pod.termination_message.strip()[-400:]}" if pod.termination_message else ""
    if pod.phase == "Succeeded":
        return Outcome("Completed", False, f"{pod.name} exited 0")
    if pod.phase != "Failed":
        return Outcome("Deleted", True, f"{pod.name} is being deleted (eviction, drain, node loss or kubectl "
                                        f"delete)")
    if code == EXIT_CONFIG:
        return Outcome("ConfigError", False, f"{pod.name}: the trainer rejected its configuration (exit {code})"
                                             f"{detail}")
    if code == EXIT_NON_FINITE:
        return Outcome("NonFiniteLoss", False, f"{pod.name}: the loss or gradients became NaN/inf (exit {code})"
                                               f"{detail}")
    if code == EXIT_STORAGE_UNAVAILABLE:
        return Outcome("StorageUnavailable", True, f"{pod.name}: storage was unreachable at start (exit {code})"
                                                   f"{detail}; restarting may help")
    if code == EXIT_PREEMPTED:
        return Outcome("Preempted", True, f"{pod.name} was stopped (SIGTERM) after committing a checkpoint "
                                          f"(exit {code})")
    if pod.container_reason == "OOMKilled":
        return Outcome("OOMKilled", True, f"{pod.name} ran out of memory (OOMKilled, exit {code})")
    if pod.pod_reason:  # Evicted, NodeLost, Shutdown, UnexpectedAdmissionError...
        message = f": {pod.pod_message}" if pod.pod_message else ""
        return Outcome(pod.pod_reason, True, f"{pod.name} failed ({pod.pod_reason}){message}")
    if code is not None and code > 128:
        return Outcome("Signal", True, f"{pod.name} was killed by {_signal_name(code)} (exit {code})")
    if code is not None:
        return Outcome("Error", True, f"{pod.name} exited {code}{detail}")
    return Outcome("Error", True, f"{pod.name} failed without an exit code")
