"""Per-job loops that run inside Kopf daemons: observe → plan (pure) → act, and poll /progress.

One reconcile loop per job coalesces every pod and job change into one status patch from a fresh
view (no stale copies racing), and is the only writer of the fields it owns; the progress loop
only writes status.progress and status.checkpoint.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from kubetrain_api.manifest import JobSpec
from kubetrain_api.status import TERMINAL

from .bookkeeping import OWNED, apply_merge_patch
from .draft import CreateFailure
from .kube import Kube, KubeError
from .metrics import JobSummary, OperatorMetrics
from .ownership import adoption_patch, conflict_message, object_ownership, ownership
from .planner import JobView, Plan, PlannerConfig, plan
from .pods import ObservedPod, classify, observe_pod
from .preparation import StageJob, StageView
from .progress import gone_report_patch, report_to_keep
from .render import JobRef, render_configmap, render_pod, render_service, render_stage_job, selector
from .validate import validate_job

JobKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class OperatorConfig:
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    resync_seconds: float = 30.0  # reconcile at least this often even without changes
    progress_interval_seconds: float = 15.0
    progress_timeout_seconds: float = 3.0
    expectation_seconds: float = 30.0  # how long our own creates/deletes are assumed before the watch shows them
    error_backoff_seconds: float = 2.0
    api_concurrency: int = 64
    # How often each job's pods are listed to find ones gone unseen: Kopf's index drops a pod only on its DELETED
    # event, which a watch gap (a dropped connection, a re-list) loses; such a pod would be waited on forever.
    audit_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """KUBETRAIN_OPERATOR_<FIELD> (upper case) overrides, e.g. KUBETRAIN_OPERATOR_RESYNC_SECONDS=10."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"KUBETRAIN_OPERATOR_{f.name.upper()}")
            if raw is not None and f.name != "planner":
                values[f.name] = type(getattr(cls(), f.name))(raw)
        planner = {f.name: type(getattr(PlannerConfig(), f.name))(env[key]) for f in dataclasses.fields(PlannerConfig)
                   if (key := f"KUBETRAIN_OPERATOR_{f.name.upper()}") in env}
        if planner:
            values["planner"] = PlannerConfig(**planner)
        return cls(**values)


class Flag(Protocol):
    """Kopf's DaemonStopped (what the loops need of it)."""

    def __bool__(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Awaitable[Any]: ...


class Runtime:
    """What the handlers share: configuration, the API client, metrics, and per-job wake-ups."""

    def __init__(self, config: OperatorConfig, kube: Kube, session: aiohttp.ClientSession):
        self.config, self.kube, self.session = config, kube, session
        self.wakeups: dict[JobKey, asyncio.Event] = {}
        self.jobs: dict[JobKey, JobSummary] = {}  # for the metrics, as of each job's last reconcile
        self.reports: dict[JobKey, ObservedPod] = {}  # an ended worker 0 (its final report), see keep_report
        self.progress_read: dict[JobKey, float] = {}  # when a worker last answered /progress (stall detection)
        self.failures: dict[JobKey, ObservedPod] = {}  # a worker's exit restarting cannot fix, see keep_report
        self.metrics = OperatorMetrics(lambda: dict(self.jobs))
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # made outside the event loop (tests)
            self.loop = None

    @classmethod
    async def start(cls, config: OperatorConfig) -> Runtime:
        kube = await Kube.connect(config.api_concurrency)
        return cls(config, kube, aiohttp.ClientSession())

    async def close(self) -> None:
        await self.session.close()
        await self.kube.close()

    def wake(self, namespace: str | None, name: str | None) -> None:
        """Wake the job's reconcile loop. Kopf runs sync handlers in its executor's threads, where an
        asyncio.Event may not be set directly (that neither is thread-safe nor wakes an idle loop)."""
        event = self.wakeups.get((namespace or "", name or ""))
        if event is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is None or running is self.loop:
            event.set()
        else:
            self.loop.call_soon_threadsafe(event.set)


    def keep_report(self, namespace: str | None, job: str | None, pod: ObservedPod | None) -> None:
        """Keep an ended worker 0's final report (e.g. its SIGTERM checkpoint) for the job's next reconcile,
        which applies it once (progress.gone_report_patch): the pod may leave the index (a suspend, a deletion)
        before any reconcile sees it there. In memory, one per job with a reconcile loop; a report lost with a
        restarted operator is the trainer's to say again (/progress after a resume)."""
        key = (namespace or "", job or "")
        kept = report_to_keep(pod, key[1])
        if kept is not None and key in self.wakeups:
            self.reports[key] = kept
        # Likewise a worker's exit 2 or 3 (a config error, a NaN loss): a pod that has ended is removed at once by
        # the operator's delete, which may have been on its way (a restart of the group) before a reconcile saw
        # the exit; the job must still fail with it rather than spend a restart.
        if pod is not None and pod.phase == "Failed" and not classify(pod).retryable and key in self.wakeups:
            self.failures.setdefault(key, pod)


class Expectations:
    """Our own recent writes, until the watch (Kopf's index) shows them: pods we created count as
    present and pods we deleted as terminating, so a reconcile right after another does not act twice."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.created: dict[str, tuple[ObservedPod, float]] = {}
        self.deleted: dict[str, float] = {}

    def merge(self, observed: Iterable[ObservedPod], now: float) -> list[ObservedPod]:
        pods = {p.name: p for p in observed}
        for name, (pod, since) in list(self.created.items()):
            seen = pods.get(name)
            if (seen is not None and seen.uid == pod.uid) or now - since > self.ttl:
                del self.created[name]
            elif seen is None:
                pods[name] = pod
        uids = {p.uid for p in pods.values()}
        for uid, since in list(self.deleted.items()):
            if uid not in uids or now - since > self.ttl:
                del self.deleted[uid]
        return [dataclasses.replace(p, terminating=True) if p.uid in self.deleted and not p.terminating else p
                for p in pods.values()]


def job_view(body: Mapping[str, Any]) -> JobView:
    meta = body.get("metadata") or {}
    labels: dict[str, str] = meta["labels"] if isinstance(meta.get("labels"), dict) else {}
    ref = JobRef(str(meta.get("name")), str(meta.get("namespace") or "default"),
                 str(meta.get("uid") or ""), dict(labels))
    checked = validate_job(ref.name, body.get("spec"))
    generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
    return JobView(ref, checked.spec, checked.error, checked.warnings, generation, checked.size_only)


def owned(status: Any) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in (status or {}).items() if k in OWNED}


class Reconciler:
    def __init__(self, rt: Runtime, body: Any, index: Any, logger: logging.Logger | logging.LoggerAdapter[Any],
                 stage_jobs: Any = None, stage_pods: Any = None):
        self.rt, self.body, self.index, self.logger = rt, body, index, logger
        self.stage_jobs, self.stage_pods = stage_jobs, stage_pods  # handlers.py's indexes of the data preparation
        self.stage_created: dict[str, tuple[StageJob, float]] = {}  # our Jobs until the watch shows them
        meta = body.get("metadata") or {}
        self.key: JobKey = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        self.own = owned(body.get("status"))
        self.expect = Expectations(rt.config.expectation_seconds)
        self.objects_ensured = False
        self.objects_checked = False  # the Service and ConfigMap of the job's names are its own (or absent)
        self.conflict: str | None = None
        self.create_failure: CreateFailure | None = None
        self.ghosts: set[str] = set()  # uids in the index that a list no longer showed (audit)
        self.audited_at = time.monotonic()

    def observed(self) -> list[ObservedPod]:
        store = self.index.get(self.key, []) if self.index is not None else []
        return self.expect.merge([p for p in store if p.uid not in self.ghosts], time.time())

    async def audit(self, ref: JobRef) -> None:
        """Every OperatorConfig.audit_seconds: the pods the index holds that a list made after them does not show
        are gone (their DELETED event was lost in a watch gap) and are left out from now on."""
        if time.monotonic() - self.audited_at < self.rt.config.audit_seconds:
            return
        indexed = {p.uid for p in (self.index.get(self.key, []) if self.index is not None else [])}
        listed = await self.rt.kube.list_pod_uids(ref.namespace, selector(ref))
        self.audited_at = time.monotonic()
        gone = indexed - listed
        if gone - self.ghosts:
            self.logger.info("pods gone without a DELETED event (a watch gap): %s", ", ".join(sorted(gone)))
        self.ghosts = gone

    def stage(self, ref: JobRef) -> tuple[StageView, list[StageJob], list[StageJob]]:
        """The data preparation's Jobs and pods; a Job we created counts as running until the watch shows it. Only
        this job's Jobs count (an earlier job's of this name would have it skip or fail its own preparation): the
        others are returned as stale (to delete) and foreign (a conflict)."""
        indexed = list(self.stage_jobs.get(self.key, [])) if self.stage_jobs is not None else []
        whose = {j.uid: ownership(j.owner, j.managed, ref) for j in indexed}
        jobs = [j for j in indexed if whose[j.uid] == "ours"]
        stale = [j for j in indexed if whose[j.uid] == "stale"]
        foreign = [j for j in indexed if whose[j.uid] == "foreign"]
        seen, now = {j.name for j in jobs}, time.time()
        for name, (job, since) in list(self.stage_created.items()):
            if name in seen or now - since > self.rt.config.expectation_seconds:
                del self.stage_created[name]
            else:
                jobs.append(job)
        ours = {j.uid for j in jobs}
        # (a worker's init container is ours when the worker is; a stage pod when its batch Job is)
        pods = [p for p in (self.stage_pods.get(self.key, []) if self.stage_pods is not None else [])
                if (ownership(p.owner, p.managed, ref) == "ours" if p.init else
                    p.owner is not None and p.owner.uid in ours)]
        # (a stale Job being deleted holds its name: the planner waits for it to go, as for one deleted by anybody)
        return StageView(jobs + [dataclasses.replace(j, terminating=True) for j in stale], pods), stale, foreign

    async def once(self) -> float:
        """One reconcile; returns how long to wait at most before the next."""
        started = time.perf_counter()
        snapshot = copy.deepcopy(dict(self.body))
        view = job_view(snapshot)
        status = {**(snapshot.get("status") or {}), **self.own}
        for key in OWNED:  # fields we removed stay removed even if the watch has not caught up
            if key not in self.own and self.own:
                status.pop(key, None)
        if view.spec is not None and not self.objects_checked and status.get("phase") not in TERMINAL:
            self.conflict = await self.foreign_objects(view.ref, view.spec)
            self.objects_checked = self.conflict is None
        view = dataclasses.replace(view, conflict=self.conflict, create_failure=self.create_failure,
                                   progress_read=self.rt.progress_read.get(self.key))
        now = time.time()
        if status.get("phase") not in TERMINAL:
            await self.audit(view.ref)
        kept, pods = self.rt.reports.get(self.key), self.observed()
        if kept is not None and ownership(kept.owner, kept.managed, view.ref) != "ours":
            kept = None  # an earlier job's of this name
        failed = self.rt.failures.get(self.key)
        if failed is not None and ownership(failed.owner, failed.managed, view.ref) == "ours" and all(
                p.uid != failed.uid for p in pods):
            pods = [*pods, failed]  # as last seen: the planner fails the job with its exit (keep_report)
        stage, stale, foreign = self.stage(view.ref)
        for job in stale:
            if not job.terminating:
                await self.rt.kube.delete_stage_job(view.ref.namespace, job.name)
                self.post_event("Normal", "StaleJobDeleted", f"batch Job {job.name}: left by an earlier job of this "
                                                             f"name: deleted, this job prepares its own data")
        if foreign and view.conflict is None:
            view = dataclasses.replace(view, conflict=f"batch Job {view.ref.namespace}/{foreign[0].name} exists and "
                                                      f"is not this job's; the job needs that name for its data "
                                                      f"preparation: delete or rename it, or rename the job")
        p = plan(view, status, pods, now, self.rt.config.planner, stage)
        p.status_patch.update(gone_report_patch(status, kept, pods, now))
        if not await self.execute(view, p):
            return 0.0  # a pod create was refused: plan again at once, knowing it (planner: CreateFailed)
        if kept is not None and self.rt.reports.get(self.key) is kept:
            del self.rt.reports[self.key]  # applied (or read by the planner from the pod): once is enough
        self.rt.jobs[self.key] = JobSummary.of(p.phase, apply_merge_patch(status, p.status_patch or {}))
        self.rt.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        return min(p.requeue_after if p.requeue_after is not None else self.rt.config.resync_seconds,
                   self.rt.config.resync_seconds)

    async def execute(self, view: JobView, p: Plan) -> bool:
        """Carry the plan out; False (and nothing after the creates done) when the API server refused a pod."""
        ns, name = self.key
        kube, metrics = self.rt.kube, self.rt.metrics
        # Creates first (a crash after them is adopted), then the status that records restarts and
        # replaced pods' uids, then the deletions (a crash before them is redone, never double-counted).
        if p.prepare is not None and view.spec is not None:  # the ConfigMap first: it holds the stage's config
            await self.ensure_objects(view.ref, view.spec, True)
            job = render_stage_job(view.ref, view.spec, p.prepare)  # type: ignore[arg-type]
            made = await kube.create(job)  # None: it exists already (the watch had not shown it yet)
            name = job["metadata"]["name"]
            uid = str((made or {}).get("metadata", {}).get("uid") or name)
            self.stage_created[name] = (StageJob(name, uid, p.prepare, active=1), time.time())
        if p.create and view.spec is not None:
            await self.ensure_objects(view.ref, view.spec, p.launch)
            results = await asyncio.gather(*(self.create_pod(view.ref, view.spec, i, p.names.get(i))
                                             for i in p.create))
            # The expectation's TTL runs from when the creates returned, not from the plan: under load
            # (many jobs' creates queued behind the API concurrency limit) they can take longer than the TTL.
            answered = time.time()
            for result in results:
                created = observe_pod(result) if isinstance(result, dict) else None
                if created is not None:
                    self.expect.created[created.name] = (created, answered)
                    metrics.pods_created.inc()
            refused = [r for r in results if isinstance(r, str)]
            if refused:
                metrics.errors.labels(kind="create").inc()
                attempts = self.create_failure.attempts + 1 if self.create_failure is not None else 1
                self.create_failure = CreateFailure(refused[0], answered, attempts)
                self.logger.warning("creating a worker pod was refused: %s", refused[0])
                return False
            self.create_failure = None
        if p.status_patch:
            await kube.patch_job_status(ns, name, p.status_patch)
            self.own = owned(apply_merge_patch(self.own or owned(self.body.get("status")), p.status_patch))
        for reason in p.restarts:
            metrics.restarts.labels(reason=reason).inc()
        for kind, reason, message in ((e.type, e.reason, e.message) for e in p.events):
            self.post_event(kind, reason, message)
        if p.delete:
            await asyncio.gather(*(self.delete_pod(d.name, d.uid, 0 if d.force else d.grace_seconds)
                                   for d in p.delete))
        for stage_job in p.stop_stage:
            await kube.delete_stage_job(ns, stage_job)
        if p.delete_job:
            self.logger.info("ttlSecondsAfterFinished passed: deleting the LLMTrainingJob")
            await kube.delete_job(ns, name)
        return True

    async def create_pod(self, ref: JobRef, spec: JobSpec, index: int, name: str | None) -> dict[str, Any] | str | None:
        """The created pod; None when it exists already and is ours (the watch had not shown it yet); what the
        API server said when it refused (quota, Pod Security admission, a webhook) or the name is another's."""
        pod = render_pod(ref, spec, index)
        if name is not None:  # the usual name is held (Draft.name_for); the hostname stays
            pod["metadata"]["name"] = name
        name = pod["metadata"]["name"]
        try:
            made = await self.rt.kube.create(pod)
        except KubeError as exc:
            if exc.status in (400, 403, 422):
                return f"pod {name}: {exc}"
            raise
        if made is None:
            existing = await self.rt.kube.read("Pod", ref.namespace, name)
            if existing is not None and object_ownership(existing, ref) == "foreign":
                return conflict_message("Pod", existing, ref)
        return made

    async def foreign_objects(self, ref: JobRef, spec: JobSpec) -> str | None:
        """Before the job's Service and ConfigMap are made: an object of one of their names that is another's
        (the conflict, ownership.py); one an earlier job of this name left is adopted."""
        for obj in (render_service(ref, spec), render_configmap(ref, spec)):
            kind, name = obj["kind"], obj["metadata"]["name"]
            existing = await self.rt.kube.read(kind, ref.namespace, name)
            whose = object_ownership(existing, ref) if existing is not None else "ours"
            if whose == "foreign":
                return conflict_message(kind, existing, ref)
            if whose == "stale":
                await self.rt.kube.patch(kind, ref.namespace, name, adoption_patch(existing, ref))
                self.post_event("Normal", "Adopted", f"{kind} {name}: left by an earlier job of this name, now "
                                                     f"this job's")
        return None

    async def delete_pod(self, pod: str, uid: str, grace_seconds: int | None) -> None:
        if await self.rt.kube.delete_pod(self.key[0], pod, grace_seconds):
            self.rt.metrics.pods_deleted.inc()
        self.expect.deleted[uid] = time.time()  # (from when the delete returned, as for creates)

    async def ensure_objects(self, ref: JobRef, spec: JobSpec, launch: bool) -> None:
        """The Service and the ConfigMap; at a (re)launch of all workers the ConfigMap is brought up to the
        spec (between launches it stays as the running workers read it)."""
        if self.objects_ensured and not launch:
            return
        kube = self.rt.kube
        await kube.create(render_service(ref, spec))
        config = render_configmap(ref, spec)
        if await kube.create(config) is None and launch:
            await kube.patch_configmap(ref.namespace, config["metadata"]["name"],
                                       {"metadata": {"annotations": config["metadata"]["annotations"]},
                                        "data": config["data"]})
        self.objects_ensured = True

    def post_event(self, kind: str, reason: str, message: str) -> None:
        log = self.logger.warning if kind == "Warning" else self.logger.info
        log("%s: %s", reason, message)
        try:
            import kopf

            kopf.event(self.body, type=kind, reason=reason, message=message[:1024])
        except LookupError:  # outside a Kopf handler context (unit tests): logging is all there is
            pass


async def _wait(stopped: Flag, wake: asyncio.Event, timeout: float) -> None:
    tasks = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait(timeout))]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def reconcile_loop(rt: Runtime, body: Any, stopped: Flag, index: Any,
                         logger: logging.Logger | logging.LoggerAdapter[Any],
                         stage_jobs: Any = None, stage_pods: Any = None) -> None:
    reconciler = Reconciler(rt, body, index, logger, stage_jobs, stage_pods)
    wake = rt.wakeups[reconciler.key] = asyncio.Event()
    try:
        while not stopped:
            wake.clear()
            try:
                delay = await reconciler.once()
            except Exception as exc:  # an API error or a bug must not end the loop: retry
                rt.metrics.errors.labels(kind="reconcile").inc()
                logger.warning("reconcile failed (retrying in %.1fs): %r", rt.config.error_backoff_seconds, exc)
                delay = rt.config.error_backoff_seconds
            await _wait(stopped, wake, max(0.0, delay))
    finally:
        if rt.wakeups.get(reconciler.key) is wake:
            del rt.wakeups[reconciler.key]
        rt.jobs.pop(reconciler.key, None)
        rt.reports.pop(reconciler.key, None)
        rt.progress_read.pop(reconciler.key, None)
        rt.failures.pop(reconciler.key, None)
