"""What the planner takes and gives (JobView, PlannerConfig → Plan), and the Draft: one planning pass,
which every policy (policies/*.py) reads and edits. Nothing here talks to Kubernetes or reads the clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain_api.manifest import JobSpec
from kubetrain_api.status import FAILED, PENDING, RESTARTING

from .bookkeeping import Bookkeeping
from .coerce import as_dict
from .pods import ObservedPod
from .render import JobRef, pod_name

RESIZING = "Resizing"  # the reason of a Restarting phase that re-forms the group at a new size (no failure)


@dataclass(frozen=True)
class PlannerConfig:
    below_min_grace_seconds: float = 120.0  # alive workers < minNodes this long → restart all
    # A failure's survivors: SIGTERM, then SIGKILL after this long. They cannot commit a checkpoint without the
    # lost rank (its shards are gone), and one blocked in a collective with a vanished peer would otherwise hold
    # the restart for the whole terminationGracePeriodSeconds (900 s by default).
    failed_group_grace_seconds: int = 30
    max_backoff_seconds: float = 600.0


@dataclass(frozen=True)
class JobView:
    ref: JobRef
    spec: JobSpec | None
    error: str | None = None  # set: the job cannot run as specified (see size_only)
    warnings: tuple[str, ...] = ()
    generation: int | None = None
    size_only: bool = False  # the error is only workers.nodes: a launched job keeps its current size


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Deletion:
    name: str
    uid: str
    force: bool = False  # grace period 0: the pod is stuck terminating (e.g. on a lost node)
    grace_seconds: int | None = None  # else the pod's own terminationGracePeriodSeconds


@dataclass
class Plan:
    phase: str
    create: list[int] = field(default_factory=list)
    delete: list[Deletion] = field(default_factory=list)
    launch: bool = False  # a (re)launch of the whole group: write the ConfigMap before the pods
    status_patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False
    restarts: list[str] = field(default_factory=list)  # reasons of the restarts counted now (metrics)
    prepare: str | None = None  # the data preparation step whose batch Job to create (preparation.py)


class Draft:
    """One planning pass: the inputs, the bookkeeping as parsed from status (`st`, updated as the
    policies decide), the phase so far and the plan so far. The planner turns it into the new status."""

    def __init__(self, job: JobView, status: Any, pods: list[ObservedPod], now: float, cfg: PlannerConfig):
        self.job, self.now, self.cfg = job, now, cfg
        self.old_status = as_dict(status)
        self.st = Bookkeeping.parse(status)
        # Only pods with the name we would give them belong to the job (labels alone could be copied).
        self.pods = {p.index: p for p in sorted(pods, key=lambda p: p.index)
                     if p.name == pod_name(job.ref, p.index)}
        self.plan = Plan(phase=self.st.phase or PENDING)
        self.deleting: set[str] = set()
        self.phase, self.reason, self.message = self.st.phase or PENDING, self.st.reason or "", self.st.message or ""
        self.requeue: list[float] = []
        self.desired: int | None = None

    def event(self, kind: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(kind, reason, message))

    def delete(self, pod: ObservedPod, force: bool = False, grace_seconds: int | None = None) -> None:
        """Delete once per pass; a pod already terminating only when forced (it is going anyway)."""
        if pod.uid in self.deleting or (pod.terminating and not force):
            return
        self.deleting.add(pod.uid)
        self.plan.delete.append(Deletion(pod.name, pod.uid, force, None if force else grace_seconds))

    def wake_at(self, when: float | None) -> None:
        if when is not None:
            self.requeue.append(max(0.0, when - self.now))

    def set_phase(self, phase: str, reason: str, message: str) -> None:
        if phase != self.st.phase:
            kind = "Warning" if phase == FAILED or (phase == RESTARTING and reason != RESIZING) else "Normal"
            self.event(kind, reason or phase, message or phase)
        self.phase, self.reason, self.message = phase, reason, message
