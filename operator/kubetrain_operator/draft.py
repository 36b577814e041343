"""What the planner takes and gives (JobView, PlannerConfig → Plan), and the Draft: one planning pass,
which every policy (policies/*.py) reads and edits. Nothing here talks to Kubernetes or reads the clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain_api.manifest import JobSpec
from kubetrain_api.status import FAILED, PENDING, RESTARTING

from .bookkeeping import Bookkeeping
from .coerce import as_dict
from .ownership import ownership
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
    # A deleted pod whose containers ended this long ago and that is still there is held by a finalizer: it
    # counts as gone, and its replacement gets another name (Draft.name_for). A kubelet removes one in seconds.
    held_pod_seconds: float = 30.0
    create_backoff_seconds: float = 2.0  # after a refused pod create, doubling to max_backoff_seconds
    # No /progress answer for this long: the job's progress is unknown (condition ProgressKnown False), and no
    # stall is ever concluded from it (policies/stall.py).
    progress_unknown_seconds: float = 120.0


@dataclass(frozen=True)
class JobView:
    ref: JobRef
    spec: JobSpec | None
    error: str | None = None  # set: the job cannot run as specified (see size_only)
    warnings: tuple[str, ...] = ()
    generation: int | None = None
    size_only: bool = False  # the error is only workers.nodes: a launched job keeps its current size
    # What the controller found when it acted (not in the spec): an object of one of the job's names that is not
    # the job's (ownership.py), and the API server refusing to create its pods (quota, admission, a webhook).
    conflict: str | None = None
    create_failure: CreateFailure | None = None
    progress_read: float | None = None  # when a worker last answered /progress (progress_loop.poll_progress)


@dataclass(frozen=True)
class CreateFailure:
    """The API server refused to create a worker pod: what it said, and when it was last tried (`attempts` in a
    row). Creates are tried again after an exponential backoff (PlannerConfig), not at every pass."""

    message: str
    last_attempt: float
    attempts: int = 1


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
    names: dict[int, str] = field(default_factory=dict)  # a created worker's name where it is not pod_name's
    prepare: str | None = None  # the data preparation step whose batch Job to create (preparation.py)
    stop_stage: list[str] = field(default_factory=list)  # data preparation Jobs to delete (a suspend)


class Draft:
    """One planning pass: the inputs, the bookkeeping as parsed from status (`st`, updated as the
    policies decide), the phase so far and the plan so far. The planner turns it into the new status."""

    def __init__(self, job: JobView, status: Any, pods: list[ObservedPod], now: float, cfg: PlannerConfig):
        self.job, self.now, self.cfg = job, now, cfg
        self.old_status = as_dict(status)
        self.st = Bookkeeping.parse(status)
        # The job's pods: named as we name them and controlled by this job (ownership.py); at an index held by a
        # finalizer, the pod that replaced it. `stale`: an earlier job's of this name; `taken`: names not free.
        self.pods: dict[int, ObservedPod] = {}
        self.stale: list[ObservedPod] = []
        self.owned: list[ObservedPod] = []  # all the job's pods (an index may have two: one held, its replacement)
        self.taken: dict[int, set[str]] = {}
        self.held_uids = {p.uid for p in pods
                          if (since := p.expected_gone_at) is not None and now >= since + cfg.held_pod_seconds}
        for p in sorted(pods, key=lambda p: (p.index, not self.held(p))):
            if not is_worker_name(p.name, job.ref, p.index):
                continue
            whose = ownership(p.owner, p.managed, job.ref)
            if whose == "stale":
                self.stale.append(p)
            if whose != "ours" or self.held(p):
                self.taken.setdefault(p.index, set()).add(p.name)
            if whose == "ours":
                self.owned.append(p)
                if p.index not in self.pods or self.held(self.pods[p.index]):
                    self.pods[p.index] = p
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

    def held(self, pod: ObservedPod) -> bool:
        """Deleted, its containers ended (or, on a lost node, its grace period) long ago
        (PlannerConfig.held_pod_seconds), and still there: a finalizer holds it. Nothing runs in it (or
        nothing that can reach the group), but its name is taken."""
        return pod.uid in self.held_uids

    def name_for(self, index: int) -> str:
        """The name of a new pod for worker `index`: pod_name's, or where that name is still held (a finalizer on a
        deleted pod, another's pod), the first of `<name>-1`, `<name>-2`, ... that is free. Its hostname stays
        pod_name's (render.render_pod), so the rendezvous address does not change."""
        base, taken = pod_name(self.job.ref, index), self.taken.get(index, set())
        return next(n for k in range(len(taken) + 1) if (n := base if k == 0 else f"{base}-{k}") not in taken)

    def wake_at(self, when: float | None) -> None:
        if when is not None:
            self.requeue.append(max(0.0, when - self.now))

    def set_phase(self, phase: str, reason: str, message: str) -> None:
        if phase != self.st.phase:
            kind = "Warning" if phase == FAILED or (phase == RESTARTING and reason != RESIZING) else "Normal"
            self.event(kind, reason or phase, message or phase)
        self.phase, self.reason, self.message = phase, reason, message


def is_worker_name(name: str, job: JobRef, index: int) -> bool:
    """pod_name's, or Draft.name_for's alternative for a name still held."""
    base = pod_name(job, index)
    return name == base or (name.startswith(base + "-") and name[len(base) + 1:].isascii()
                            and name[len(base) + 1:].isdigit())
