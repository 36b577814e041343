"""The reconcile planner: (job, its status, observed pods, now) → what to do and the new status.

Pure and level-triggered: every decision comes from the spec, the pods as observed now, and the
bookkeeping the operator keeps in the job's own status (so a restarted operator continues exactly).
The controller executes a Plan; nothing here talks to Kubernetes.

Restarts: a worker that fails, is deleted or disappears is recreated (after an exponential backoff)
while the others keep running (torchrun re-rendezvous), and counts one restart. Worker 0 hosts the
rendezvous, so its loss restarts all workers (one restart), as do a stall and staying below
minNodes for longer than the grace period. Each counted pod's uid is recorded before anything is
deleted, so no failure is counted twice, whenever the operator stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .coerce import as_count, as_dict
from .pods import ObservedPod, Outcome, classify
from .render import JobRef, pod_name, selector
from .spec import JobSpec
from .status import CONDITION_TYPES, FAILED, PENDING, RESTARTING, RUNNING, SUCCEEDED, SUSPENDED, TERMINAL
from .timeutil import iso, iso_precise, parse_time

OWNED = ("phase", "reason", "message", "conditions", "workers", "restarts", "startTime", "completionTime",
         "observedGeneration", "selector", "tracking")


@dataclass(frozen=True)
class PlannerConfig:
    below_min_grace_seconds: float = 120.0  # alive workers < minNodes this long → restart all
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


def backoff_seconds(base: float, restarts: int, cap: float) -> float:
    return float(min(cap, base * 2 ** max(0, restarts - 1)))


# --- status parsing (robust to anything a user or an older operator wrote) ---------------------------

@dataclass
class _State:
    phase: str | None
    reason: str | None
    message: str | None
    conditions: list[dict[str, Any]]
    restarts: int
    start_time: float | None
    completion_time: float | None
    launched: int
    replacing: dict[str, str]
    last_failure: float | None
    below_min_since: float | None
    restart_time: float | None
    full_restart: bool
    step_time: float | None

    @classmethod
    def parse(cls, status: Any) -> _State:
        s = as_dict(status)
        t = as_dict(s.get("tracking"))
        phase = s.get("phase") if s.get("phase") in (PENDING, RUNNING, RESTARTING, SUSPENDED, *TERMINAL) else None
        return cls(
            phase=phase,
            reason=s.get("reason") if isinstance(s.get("reason"), str) else None,
            message=s.get("message") if isinstance(s.get("message"), str) else None,
            conditions=[c for c in s.get("conditions") or [] if isinstance(c, dict) and isinstance(c.get("type"), str)]
            if isinstance(s.get("conditions"), list) else [],
            restarts=as_count(s.get("restarts")) or 0,
            start_time=parse_time(s.get("startTime")),
            completion_time=parse_time(s.get("completionTime")),
            launched=as_count(t.get("launched")) or 0,
            replacing={k: v for k, v in as_dict(t.get("replacing")).items() if k.isdigit() and isinstance(v, str)},
            last_failure=parse_time(t.get("lastFailureTime")),
            below_min_since=parse_time(t.get("belowMinSince")),
            restart_time=parse_time(t.get("restartTime")),
            full_restart=t.get("fullRestart") is True,
            step_time=parse_time(as_dict(s.get("progress")).get("stepTime")),
        )


def update_conditions(previous: list[dict[str, Any]], phase: str, reason: str, message: str,
                      now: float) -> list[dict[str, Any]]:
    """One condition per phase type: True for the current phase, False for the others once they existed."""
    by_type = {c["type"]: c for c in previous}
    out = []
    for kind in CONDITION_TYPES:
        old = by_type.get(kind)
        status = "True" if kind == phase else "False"
        if old is None and status == "False":
            continue
        if old is not None and old.get("status") == status and (status == "False" or (
                old.get("reason") == reason and old.get("message") == message)):
            out.append(old)
            continue
        changed = old is None or old.get("status") != status
        out.append({"type": kind, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": iso(now) if changed or old is None else old.get("lastTransitionTime")})
    return out


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new` (dicts recurse; None deletes)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) else value
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


# --- the planner --------------------------------------------------------------------------------------

class _Planner:
    def __init__(self, job: JobView, status: Any, pods: list[ObservedPod], now: float, cfg: PlannerConfig):
        self.job, self.now, self.cfg = job, now, cfg
        self.old_status = as_dict(status)
        self.st = _State.parse(status)
        # Only pods with the name we would give them belong to the job (labels alone could be copied).
        self.pods = {p.index: p for p in sorted(pods, key=lambda p: p.index)
                     if p.name == pod_name(job.ref, p.index)}
        self.plan = Plan(phase=self.st.phase or PENDING)
        self.deleting: set[str] = set()
        self.phase, self.reason, self.message = self.st.phase or PENDING, self.st.reason or "", self.st.message or ""
        self.requeue: list[float] = []
        self.desired: int | None = None

    # helpers
    def event(self, kind: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(kind, reason, message))

    def delete(self, pod: ObservedPod, force: bool = False) -> None:
        if pod.uid in self.deleting or (pod.terminating and not force):
            return
        self.deleting.add(pod.uid)
        self.plan.delete.append(Deletion(pod.name, pod.uid, force))

    def wake_at(self, when: float | None) -> None:
        if when is not None:
            self.requeue.append(max(0.0, when - self.now))

    def set_phase(self, phase: str, reason: str, message: str) -> None:
        if phase != self.st.phase:
            kind = "Warning" if phase in (FAILED, RESTARTING) else "Normal"
            self.event(kind, reason or phase, message or phase)
        self.phase, self.reason, self.message = phase, reason, message

    # the decision
    def run(self) -> Plan:
        job, st = self.job, self.st
        # The size a started job runs at, kept when a resize is refused.
        recorded = as_count(as_dict(self.old_status.get("workers")).get("desired")) or 0
        current = recorded if st.start_time is not None else 0
        if st.phase in TERMINAL:
            self.finished(None)
        elif job.spec is not None and job.error is not None and job.size_only and current > 0:
            # `kubectl scale` to a size the batch does not split over: keep the size, say why.
            if self.old_status.get("observedGeneration") != job.generation:
                self.event("Warning", "ScaleRejected", f"{job.error}; staying at {current} workers")
            workers = job.spec.workers.model_copy(update={"nodes": current, "min_nodes": None, "max_nodes": None})
            self.active(job.spec.model_copy(update={"workers": workers}))
        elif job.spec is None or job.error is not None:
            self.fail("InvalidSpec", job.error or "invalid spec")
        else:
            self.active(job.spec)
        return self.finish_plan()

    def fail(self, reason: str, message: str) -> None:
        self.plan.create, self.plan.launch = [], False
        self.set_phase(FAILED, reason, message)
        self.st.completion_time = self.now
        self.finished(reason)

    def succeed(self, message: str) -> None:
        self.set_phase(SUCCEEDED, "Completed", message)
        self.st.completion_time = self.now
        self.finished("Completed")

    def finished(self, new_reason: str | None) -> None:
        spec = self.job.spec
        self.st.replacing, self.st.below_min_since, self.st.full_restart = {}, None, False
        policy = spec.run_policy.clean_pod_policy if spec else "Running"
        if (new_reason or self.reason) == "DeadlineExceeded" and policy == "None":
            policy = "Running"  # past its deadline a job's workers always stop
        for pod in self.pods.values():
            if policy == "All" or (policy == "Running" and pod.phase in ("Pending", "Running", "Unknown")):
                self.delete(pod)
        ttl = spec.run_policy.ttl_seconds_after_finished if spec else None
        done = self.st.completion_time
        if ttl is not None and done is not None:
            if self.now >= done + ttl:
                self.plan.delete_job = True
            else:
                self.wake_at(done + ttl)

    def active(self, spec: JobSpec) -> None:
        self.desired = spec.workers.nodes
        rp, st = spec.run_policy, self.st
        desired = spec.workers.nodes
        low = spec.workers.elastic_range[0]
        p0 = self.pods.get(0)
        if p0 is not None and p0.phase == "Succeeded":
            return self.succeed(f"worker 0 exited 0 after {st.restarts} restart(s)")
        for pod in self.pods.values():
            if pod.phase == "Failed" and st.replacing.get(str(pod.index)) != pod.uid:
                outcome = classify(pod)
                if not outcome.retryable:
                    return self.fail(outcome.reason, outcome.message)
        deadline = rp.active_deadline_seconds
        if deadline and st.start_time is not None and st.phase != SUSPENDED:
            if self.now >= st.start_time + deadline:
                return self.fail("DeadlineExceeded", f"running longer than runPolicy.activeDeadlineSeconds "
                                                     f"({deadline}s)")
            self.wake_at(st.start_time + deadline)
        if rp.suspend:
            return self.suspend()
        if st.phase == SUSPENDED:
            self.event("Normal", "Resumed", "runPolicy.suspend is false: relaunching the workers")
            st.start_time = None  # the deadline counts from the relaunch, as for Kubernetes Jobs

        # Scale-down: pods beyond the desired size go (gracefully: they checkpoint first).
        for pod in self.pods.values():
            if pod.index >= desired:
                self.delete(pod)
        st.replacing = {k: v for k, v in st.replacing.items() if int(k) < desired}
        previous = as_count(as_dict(self.old_status.get("workers")).get("desired"))
        previous = desired if previous is None else previous
        if st.launched and previous != desired:
            self.event("Normal", "Scaled", f"workers {previous} → {desired}")
        st.launched = min(st.launched, desired)

        if not st.full_restart and not self.count_incidents(spec):
            return
        self.create(spec, desired)
        if not st.full_restart:
            self.check_below_min(spec, low)
        if self.phase in TERMINAL:
            return
        self.decide_phase(spec, low, desired)
        if self.phase == RUNNING and not st.full_restart:
            self.check_stall(spec)

    def suspend(self) -> None:
        for pod in self.pods.values():
            self.delete(pod)
        st = self.st
        # The pods going away stay recorded as handled until the relaunch, so none is counted later.
        st.replacing = {str(p.index): p.uid for p in self.pods.values()}
        st.launched, st.below_min_since, st.full_restart = 0, None, False
        left = sum(1 for p in self.pods.values() if p.alive or p.terminating)
        self.set_phase(SUSPENDED, "Suspended", "runPolicy.suspend is true: workers stopped (each checkpoints "
                                               "on SIGTERM)" + (f"; {left} terminating" if left else ""))

    def count(self, n: int, reason: str, message: str) -> bool:
        """Count `n` restarts; False (and the job failed) when that goes past runPolicy.maxRestarts."""
        limit = self.job.spec.run_policy.max_restarts if self.job.spec else 0
        if self.st.restarts + n > limit:
            self.fail("MaxRestartsExceeded", f"{message}; restart limit reached (runPolicy.maxRestarts: {limit})")
            return False
        self.st.restarts += n
        self.st.last_failure = self.now
        self.plan.restarts.extend([reason] * n)
        return True

    def count_incidents(self, spec: JobSpec) -> bool:
        st, desired = self.st, spec.workers.nodes
        incidents: list[tuple[int, str, Outcome]] = []
        for i in range(desired):
            pod, handled = self.pods.get(i), st.replacing.get(str(i))
            if pod is None:
                if i < st.launched and handled is None:
                    name = pod_name(self.job.ref, i)
                    incidents.append((i, "", Outcome("Lost", True, f"{name} disappeared (force-deleted?)")))
            elif pod.ended_badly and handled != pod.uid and (pod.phase == "Failed" or i < st.launched):
                incidents.append((i, pod.uid, classify(pod)))
            elif pod.alive and handled is not None and handled != pod.uid:
                del st.replacing[str(i)]  # its replacement is up
            elif pod.phase == "Failed" and handled == pod.uid:
                self.delete(pod)  # counted before; the deletion may not have happened
        if not incidents:
            return True
        full = any(i == 0 for i, _, _ in incidents)
        first = incidents[0][2]
        if not self.count(1 if full else len(incidents), first.reason, first.message):
            return False
        backoff = backoff_seconds(spec.run_policy.restart_backoff_seconds, st.restarts, self.cfg.max_backoff_seconds)
        for i, uid, outcome in incidents:
            st.replacing[str(i)] = uid
            self.event("Warning", f"Worker{outcome.reason}" if outcome.reason != "Lost" else "WorkerLost",
                       f"{outcome.message}; restart {st.restarts} of {spec.run_policy.max_restarts}, "
                       f"{'all workers' if full else 'recreating it'} in {backoff:g}s")
            pod = self.pods.get(i)
            if pod is not None and pod.phase == "Failed":
                self.delete(pod)
        if full:
            self.restart_all("worker 0 (the rendezvous host) ended: " + first.message)
        return True

    def restart_all(self, why: str, force_older_than: float | None = None) -> None:
        st = self.st
        st.full_restart, st.below_min_since, st.restart_time = True, None, self.now
        self.plan.create, self.plan.launch = [], False
        for pod in self.pods.values():
            st.replacing[str(pod.index)] = pod.uid
            stuck = (force_older_than is not None and pod.terminating and pod.deletion_time is not None
                     and pod.deletion_time <= force_older_than)
            self.delete(pod, force=stuck)
        self.event("Warning", "RestartingAllWorkers", why)

    def check_below_min(self, spec: JobSpec, low: int) -> None:
        """Fewer than minNodes alive (e.g. a worker stuck terminating on a lost node) for longer than the
        grace period: restart all, force-deleting pods stuck terminating. Waiting out a backoff is exempt."""
        st = self.st
        alive = len(self.plan.create) + sum(1 for p in self.pods.values() if p.alive and p.index < spec.workers.nodes
                                            and p.uid not in self.deleting)
        backing_off = any(
            int(k) not in self.plan.create and (int(k) not in self.pods or self.pods[int(k)].uid in self.deleting)
            for k in st.replacing)
        if st.launched == 0 or alive >= low or backing_off:
            st.below_min_since = None
            return
        if st.below_min_since is None:
            st.below_min_since = self.now
        grace = self.cfg.below_min_grace_seconds
        if self.now - st.below_min_since < grace:
            return self.wake_at(st.below_min_since + grace)
        message = f"only {alive} of minimum {low} workers alive for {grace:g}s"
        if self.count(1, "BelowMinNodes", message):
            self.restart_all(message + "; restarting all workers", force_older_than=self.now - grace)

    def check_stall(self, spec: JobSpec) -> None:
        timeout = spec.run_policy.stall_timeout_seconds
        st = self.st
        if not timeout:
            return
        since = max(t for t in (st.step_time, st.restart_time, st.start_time, 0.0) if t is not None)
        if self.now - since < timeout:
            return self.wake_at(since + timeout)
        step = as_dict(self.old_status.get("progress")).get("step")
        message = f"no training step for {timeout}s (stuck at step {step}); a hung collective is the usual cause"
        if self.count(1, "Stalled", message):
            self.restart_all(message + "; restarting all workers")
            self.decide_phase(spec, spec.workers.elastic_range[0], spec.workers.nodes)

    def create(self, spec: JobSpec, desired: int) -> None:
        st = self.st
        present = {p.index for p in self.pods.values()}
        missing = [i for i in range(desired) if i not in present]
        backoff_until = None
        if st.last_failure is not None and st.restarts:
            backoff_until = st.last_failure + backoff_seconds(
                spec.run_policy.restart_backoff_seconds, st.restarts, self.cfg.max_backoff_seconds)
        backed_off = backoff_until is None or self.now >= backoff_until
        if st.full_restart:  # relaunch together once every old pod is gone (they checkpoint on SIGTERM)
            old = set(st.replacing.values())
            for pod in self.pods.values():
                if pod.uid in old:
                    self.delete(pod)
            if any(p.uid in old for p in self.pods.values()):
                return
            if not backed_off:
                return self.wake_at(backoff_until)
            self.launch(missing)
        elif st.launched == 0:  # first launch or resume: adopt live pods, wait for terminating ones
            if any(p.terminating for p in self.pods.values()):
                return
            self.launch(missing)
        else:
            for i in missing:
                if str(i) not in st.replacing or backed_off:  # scale-up needs no backoff
                    self.plan.create.append(i)
                else:
                    self.wake_at(backoff_until)
            if backoff_until is not None and not backed_off and st.replacing:
                self.wake_at(backoff_until)  # a replaced pod may still be going away
            if missing and not self.plan.create:
                return
            # Scaled up over a worker still leaving from a scale-down: launched stops below it.
            leaving = [i for i in range(st.launched, desired) if i in self.pods and self.pods[i].terminating]
            if leaving:
                st.launched = min(leaving)
                return
        st.launched = desired

    def launch(self, missing: list[int]) -> None:
        st = self.st
        self.plan.create, self.plan.launch = missing, True
        st.full_restart, st.replacing, st.restart_time = False, {}, self.now
        if st.start_time is None:
            st.start_time = self.now
            for warning in self.job.warnings:
                self.event("Warning", "SpecWarning", warning)

    def decide_phase(self, spec: JobSpec, low: int, desired: int) -> None:
        st = self.st
        live = [p for p in self.pods.values() if p.index < desired and p.uid not in self.deleting]
        running = sum(1 for p in live if p.alive and p.phase in ("Running", "Succeeded"))
        alive = sum(1 for p in live if p.alive) + len(self.plan.create)
        if st.full_restart:
            self.set_phase(RESTARTING, "RestartingAllWorkers", f"restart {st.restarts}: relaunching all workers")
        elif running >= low:
            if self.phase != RUNNING:
                st.restart_time = self.now  # stall detection counts from here
            note = f"; replacing {len(st.replacing)}" if st.replacing else ""
            self.set_phase(RUNNING, "WorkersRunning", f"{running}/{desired} workers running{note}")
        elif st.replacing:
            self.set_phase(RESTARTING, "ReplacingWorkers",
                           f"restart {st.restarts}: {alive}/{desired} workers alive, minimum {low}")
        else:
            waiting = next((f"; {p.name}: {p.waiting}" for p in live if p.waiting), "")
            self.set_phase(PENDING, "WorkersStarting", f"{running}/{desired} workers running{waiting}"[:1000])

    # the new status
    def finish_plan(self) -> Plan:
        st, job = self.st, self.job
        desired = self.desired if self.desired is not None else (job.spec.workers.nodes if job.spec else 0)
        in_range = [p for p in self.pods.values() if p.index < max(desired, 1) and p.uid not in self.deleting]
        if self.phase in TERMINAL or self.phase == SUSPENDED:
            in_range = [p for p in in_range if not p.terminating and p.uid not in self.deleting]
        workers = {
            "desired": desired,
            "active": sum(1 for p in in_range if p.alive and p.phase != "Succeeded") + len(self.plan.create),
            "ready": sum(1 for p in in_range if p.ready),
            "failed": sum(1 for p in self.pods.values() if p.ended_badly),
        }
        tracking = {
            "launched": st.launched,
            "replacing": dict(sorted(st.replacing.items(), key=lambda kv: int(kv[0]))),
            "lastFailureTime": iso_precise(st.last_failure) if st.last_failure is not None else None,
            "belowMinSince": iso_precise(st.below_min_since) if st.below_min_since is not None else None,
            "restartTime": iso_precise(st.restart_time) if st.restart_time is not None else None,
            "fullRestart": st.full_restart,
        }
        new: dict[str, Any] = {
            "phase": self.phase, "reason": self.reason, "message": self.message,
            "conditions": update_conditions(st.conditions, self.phase, self.reason, self.message, self.now),
            "workers": workers, "restarts": st.restarts,
            "startTime": iso_precise(st.start_time) if st.start_time is not None else None,
            "completionTime": iso_precise(st.completion_time) if st.completion_time is not None else None,
            "observedGeneration": job.generation, "selector": selector(job.ref),
            "tracking": {k: v for k, v in tracking.items() if v is not None},
        }
        new = {k: v for k, v in new.items() if v is not None}
        old = {k: self.old_status[k] for k in OWNED if k in self.old_status}
        self.plan.status_patch = merge_patch(old, new)
        self.plan.phase = self.phase
        self.plan.requeue_after = min(self.requeue) if self.requeue else None
        return self.plan


def plan(job: JobView, status: Any, pods: list[ObservedPod], now: float,
         cfg: PlannerConfig | None = None) -> Plan:
    """What to do now for one job. Never raises on any status or pod state."""
    return _Planner(job, status, pods, now, cfg or PlannerConfig()).run()
