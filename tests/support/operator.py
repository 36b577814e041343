"""Helpers for the operator tests: specs, pods, an in-memory cluster for the planner, and for the tests
against a real API server (tests/cluster): a Node the real scheduler binds worker pods to, the kubelet's
part played by the test (`PlayedKubelet`), LLMTrainingJob requests (`Jobs`), and the operator in-process."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import copy
import dataclasses
import datetime as _dt
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.client import ApiError, Kube, ns_path
from kubetrain_api.exit_codes import EXIT_PREEMPTED
from kubetrain_api.manifest import API_VERSION, KIND
from kubetrain_operator.bookkeeping import apply_merge_patch
from kubetrain_operator.ownership import Owner
from kubetrain_operator.planner import JobView, Plan, PlannerConfig, plan
from kubetrain_operator.pods import ObservedPod
from kubetrain_operator.preparation import JOB_SUFFIXES, StageJob, StageView
from kubetrain_operator.render import JobRef
from kubetrain_operator.validate import validate_job

from support import deep_merge, job_manifest, wait_for, wait_until


def job_view(spec: Any, name: str = "job", namespace: str = "default", uid: str = "uid-job",
             generation: int = 1) -> JobView:
    checked = validate_job(name, spec)
    return JobView(JobRef(name, namespace, uid), checked.spec, checked.error, checked.warnings, generation,
                   checked.size_only)


def pod(index: int, phase: str = "Running", *, job: str = "job", uid: str | None = None, **fields: Any) -> ObservedPod:
    """A worker pod of job_view's job (controlled by it, with our labels) unless `owner`/`managed` say otherwise."""
    fields = {"owner": Owner(API_VERSION, KIND, job, "uid-job"), "managed": True, **fields}
    return ObservedPod(name=f"{job}-worker-{index}", index=index, uid=uid or f"uid-{index}", phase=phase, **fields)


def failed(index: int, exit_code: int = 1, **fields: Any) -> ObservedPod:
    return pod(index, "Failed", exit_code=exit_code, container_reason="Error", **fields)


@dataclass
class Sim:
    """A cluster of pods for the planner: creations start Pending; deletions are immediate, or leave
    the pod terminating when `graceful`. Status patches are applied as a real API server would."""

    spec: dict[str, Any]
    cfg: PlannerConfig = field(default_factory=lambda: PlannerConfig(below_min_grace_seconds=30))
    now: float = 1_000_000.0
    graceful: bool = False
    status: dict[str, Any] = field(default_factory=dict)
    pods: dict[int, ObservedPod] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list)
    created: int = 0
    generation: int = 1
    stage: StageView = field(default_factory=StageView)  # the data preparation's Jobs and pods
    _uids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _last_spec: Any = None
    _ended_terminating: set[str] = field(default_factory=set)
    _ended_seen_at: float = 0.0
    progress_read: float | None = None  # when /progress last answered (the controller's, for the planner)

    def step(self, advance: float = 0.0) -> Plan:
        self.now += advance
        if self._last_spec is not None and self._last_spec != self.spec:
            self.generation += 1  # as the API server does when the spec changes
        self._last_spec = copy.deepcopy(self.spec)
        # A deleted pod whose containers have ended is gone once time has passed (its kubelet's final delete; no
        # finalizers here).
        if self.now > self._ended_seen_at:
            self.pods = {i: x for i, x in self.pods.items() if x.uid not in self._ended_terminating}
            self._ended_terminating = {x.uid for x in self.pods.values() if x.ended_while_terminating}
            self._ended_seen_at = self.now
        view = replace(job_view(self.spec, generation=self.generation), progress_read=self.progress_read)
        p = plan(view, copy.deepcopy(self.status), list(self.pods.values()), self.now, self.cfg, self.stage)
        self.status = apply_merge_patch(self.status, copy.deepcopy(p.status_patch))
        for d in p.delete:
            victim = next(x for x in self.pods.values() if x.name == d.name)
            # (a real API server removes a pod that has ended at once: only a finalizer would keep it)
            if self.graceful and not d.force and victim.phase not in ("Failed", "Succeeded"):
                grace = d.grace_seconds if d.grace_seconds is not None else 900
                self.pods[victim.index] = replace(victim, terminating=True, deletion_time=self.now,
                                                  deletion_deadline=self.now + grace)
            else:
                del self.pods[victim.index]
        for i in p.create:
            # (over a deleted pod that has ended, held too long: the planner names the new one apart; the Sim keeps
            # one pod per index, so the held one is dropped. The Sim's kubelet never ends a deleted pod at its
            # deadline, so one that is not ready and long past it is what a lost node leaves: gone too.)
            old = self.pods.get(i)
            assert old is None or old.ended_while_terminating or (
                old.terminating and not old.ready and old.deletion_deadline is not None
                and self.now >= old.deletion_deadline + self.cfg.held_pod_seconds), f"created worker {i} over a pod"
            self.pods[i] = pod(i, "Pending", uid=f"uid-{i}-{next(self._uids)}")
            self.created += 1
        for name in p.stop_stage:  # deleted (background propagation: it shows terminating a while)
            self.stage.jobs[:] = [dataclasses.replace(j, terminating=True) if j.name == name else j
                                  for j in self.stage.jobs]
        if p.prepare is not None:  # the stage's batch Job, created as the controller would (active: 1 pod)
            name = view.ref.name + JOB_SUFFIXES[p.prepare]
            assert name not in {j.name for j in self.stage.jobs}, f"created the Job {name} twice"
            self.stage.jobs.append(StageJob(name, f"uid-{name}-{next(self._uids)}", p.prepare, active=1))
        self.plans.append(p)
        return p

    def set(self, index: int, phase: str, **fields: Any) -> None:
        self.pods[index] = replace(self.pods[index], phase=phase, **fields)

    def run_all(self) -> None:
        for i in list(self.pods):
            self.set(i, "Running", ready=True)

    def gone(self, index: int) -> None:
        self.pods.pop(index, None)  # (a deleted pod that had ended may be gone already)

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def restarts(self) -> int:
        return int(self.status.get("restarts", 0))

    def events(self, reason: str | None = None) -> list[str]:
        return [f"{e.reason}: {e.message}" for p in self.plans for e in p.events
                if reason is None or e.reason == reason]


@contextlib.asynccontextmanager
async def cancelled_on_exit(coro: Awaitable[Any]) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# --- a real API server; the tests play kubelet ------------------------------------------------------------

GROUP, VERSION, PLURAL = "kubetrain.io", "v1alpha1", "llmtrainingjobs"
FINALIZER = f"{GROUP}/finalizer"
PLAYED_NODE = "kubetrain-played-node"
PLAYED_TAINT = "kubetrain.io/played-kubelet"
POD_IP = "127.0.0.1"  # every pod's IP as the played kubelet reports it: tests serve /progress there
CONTAINER = "trainer"
log = logging.getLogger(__name__)


def placement() -> dict[str, Any]:
    """The podTemplate part that puts a job's workers on the played node (and tolerates its taint)."""
    return {"nodeSelector": {"kubernetes.io/hostname": PLAYED_NODE},
            "tolerations": [{"key": PLAYED_TAINT, "operator": "Exists", "effect": "NoSchedule"}]}


def e2e_job(name: str, namespace: str, **sections: Any) -> dict[str, Any]:
    """An LLMTrainingJob manifest (PLACEHOLDER_SPEC) whose workers are scheduled onto the played node."""
    return job_manifest(name, namespace, **deep_merge({"workers": {"podTemplate": placement()}}, sections))


def stamp(micro: bool = False) -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


class PlayedNode:
    """A Node object that the real scheduler binds the tests' worker pods to. It is kept Ready as a kubelet
    keeps its node: by renewing its Lease in kube-node-lease (the node lifecycle controller's heartbeat;
    without it the node turns NotReady after 50 s and its pods are tainted for eviction). Its own taint keeps
    other tests' pods off it; `placement()` tolerates it. Nothing runs there: see PlayedKubelet."""

    def __init__(self, kube: Kube, name: str = PLAYED_NODE, renew_seconds: float = 5.0):
        self.kube, self.name, self.renew_seconds = kube, name, renew_seconds
        self.lease = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)

    def start(self) -> PlayedNode:
        now, capacity = stamp(), {"cpu": "64", "memory": "256Gi", "pods": "1000"}
        node = self.kube.create("/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name,
                         "labels": {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux"}},
            "spec": {"taints": [{"key": PLAYED_TAINT, "value": "true", "effect": "NoSchedule"}]},
            "status": {"capacity": capacity, "allocatable": capacity,
                       "addresses": [{"type": "InternalIP", "address": POD_IP},
                                     {"type": "Hostname", "address": self.name}],
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "played by the tests", "lastHeartbeatTime": now,
                                       "lastTransitionTime": now}]}})
        self.uid = node["metadata"]["uid"]
        self._renew()
        self._thread.start()
        # The NodeTaint admission plugin taints every new node not-ready; the node lifecycle controller lifts
        # the taint once it has seen the Ready condition.
        wait_for(lambda: [t["key"] for t in self.kube.get(f"/api/v1/nodes/{self.name}")["spec"].get("taints", [])]
             == [PLAYED_TAINT], timeout=60, what=f"node {self.name} without the not-ready taint")
        return self

    def _renew(self) -> None:
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": stamp(micro=True)}
        try:
            self.kube.patch(self.lease, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}
            self.kube.create(self.lease.rsplit("/", 1)[0], {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "ownerReferences": [owner]}, "spec": spec})

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self._renew()
            except Exception as exc:  # a missed beat; the next one retries well within the grace period
                log.warning("node heartbeat failed: %r", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.kube.delete(f"/api/v1/nodes/{self.name}")
        self.kube.delete(self.lease)


class PlayedKubelet:
    """The kubelet's part for the pods of one namespace on the played node. It writes their status through
    the /status subresource as a kubelet does (strategic merge patches; the pod's uid in the body, so a
    status never lands on a recreated pod of the same name): phase, host and pod IPs, conditions, container
    states with exit codes. While `running()`, it finishes graceful deletions: a bound pod deleted with a
    grace period stays Terminating (deletionTimestamp) until its kubelet has stopped it; this one "sends
    SIGTERM" (the trainer exits 143), then deletes the pod with gracePeriodSeconds 0. Pods named in
    `stuck` are left Terminating, as on a lost node."""

    def __init__(self, kube: Kube, namespace: str, node: str = PLAYED_NODE):
        self.kube, self.namespace, self.node = kube, namespace, node
        self.stuck: set[str] = set()
        self.finished: list[str] = []  # the pods whose graceful deletion it completed, in order

    def path(self, name: str | None = None) -> str:
        return ns_path(self.namespace, "pods", name)

    def pods(self, job: str = "job") -> dict[str, dict[str, Any]]:
        """The job's worker pods (Terminating ones included, as `kubectl get pods` shows them)."""
        items = self.kube.list(self.path(), labelSelector=f"kubetrain.io/job-name={job}")
        return {p["metadata"]["name"]: p for p in items}

    def uids(self, job: str = "job") -> dict[str, str]:
        return {name: p["metadata"]["uid"] for name, p in self.pods(job).items()}

    def _bound(self, name: str) -> dict[str, Any] | None:
        pod = self.kube.find(self.path(name))
        if pod is None or not pod["spec"].get("nodeName"):
            return None
        assert pod["spec"]["nodeName"] == self.node, f"{name} was bound to {pod['spec']['nodeName']}"
        return dict(pod)

    async def run(self, name: str, ready: bool = True) -> None:
        """Once the scheduler has bound it: the container started (and ready), at POD_IP."""
        pod = await wait_until(lambda: self._bound(name), what=f"{name} bound to {self.node} by the scheduler")
        now = stamp()
        image = pod["spec"]["containers"][0]["image"]
        ready_ = "True" if ready else "False"
        self._write(pod, {
            "phase": "Running", "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}], "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}], "startTime": now,
            "conditions": [{"type": t, "status": s, "lastTransitionTime": now} for t, s in
                           (("Initialized", "True"), ("ContainersReady", ready_), ("Ready", ready_))],
            "containerStatuses": [{"name": CONTAINER, "image": image, "imageID": "", "ready": ready,
                                   "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}}}]})

    async def run_all(self, job: str = "job") -> None:
        for name, pod in self.pods(job).items():
            if not pod["metadata"].get("deletionTimestamp"):
                await self.run(name)

    def exit(self, name: str, code: int, message: str = "", reason: str | None = None) -> None:
        """The container exited with `code` (restartPolicy Never: the pod's phase follows)."""
        pod = self._bound(name)
        assert pod is not None, f"{name} is not bound"
        self._write(pod, self._exited(pod, code, message, reason))

    def _exited(self, pod: dict[str, Any], code: int, message: str, reason: str | None) -> dict[str, Any]:
        now = stamp()
        started = ((pod.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {})
                   .get("running", {}).get("startedAt", now))
        term = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"), "startedAt": started,
                "finishedAt": now, **({"message": message} if message else {})}
        return {"phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
                               for t in ("ContainersReady", "Ready")],
                "containerStatuses": [{"name": CONTAINER, "image": pod["spec"]["containers"][0]["image"],
                                       "imageID": "", "ready": False, "restartCount": 0, "started": False,
                                       "state": {"terminated": term}}]}

    def _write(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        self.kube.patch(self.path(pod["metadata"]["name"]) + "/status",
                        {"metadata": {"uid": pod["metadata"]["uid"]}, "status": status}, patch_type="strategic")

    def finish(self, pod: dict[str, Any]) -> None:
        """A Terminating pod: its container stops on SIGTERM (exit 143), then the pod is deleted for good."""
        meta = pod["metadata"]
        self.finished.append(meta["name"])  # before the pod is gone: whoever sees it gone sees this
        try:
            if pod.get("status", {}).get("phase") == "Running":
                self._write(pod, self._exited(pod, EXIT_PREEMPTED, "", None))
            self.kube.delete(self.path(meta["name"]), {"gracePeriodSeconds": 0,
                                                      "preconditions": {"uid": meta["uid"]}})
        except ApiError as exc:
            self.finished.remove(meta["name"])  # not this kubelet's doing
            if exc.status not in (404, 409, 422):  # gone or replaced meanwhile
                raise

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PlayedKubelet]:
        """Finishes graceful deletions in the background (polls every 50 ms)."""

        async def reap() -> None:
            while True:
                try:
                    for pod in await asyncio.to_thread(self.kube.list, self.path()):
                        if pod["metadata"].get("deletionTimestamp") and pod["metadata"]["name"] not in self.stuck:
                            await asyncio.to_thread(self.finish, pod)
                except Exception as exc:  # the API server restarting, a pod changing meanwhile: next round
                    log.warning("played kubelet: %r", exc)
                await asyncio.sleep(0.05)

        async with cancelled_on_exit(reap()):
            yield self

    def clear(self) -> None:
        """After a test, with the operator stopped: release the jobs' finalizers and remove the pods (a
        kubelet would have), so that the namespace can be deleted."""
        jobs = ns_path(self.namespace, PLURAL, group=GROUP, version=VERSION)
        for job in self.kube.list(jobs):
            if job["metadata"].get("finalizers"):
                self.kube.patch(f"{jobs}/{job['metadata']['name']}", {"metadata": {"finalizers": None}})
        for pod in self.kube.list(self.path()):
            self.kube.delete(self.path(pod["metadata"]["name"]), {"gracePeriodSeconds": 0})


class Jobs:
    """The tests' own LLMTrainingJob requests in one namespace (what a user does with kubectl)."""

    def __init__(self, kube: Kube, namespace: str):
        self.kube, self.namespace = kube, namespace

    def path(self, name: str | None = None) -> str:
        return ns_path(self.namespace, PLURAL, name, group=GROUP, version=VERSION)

    def manifest(self, name: str = "job", **sections: Any) -> dict[str, Any]:
        return e2e_job(name, self.namespace, **sections)

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return dict(self.kube.create(self.path(), manifest))

    def get(self, name: str = "job") -> dict[str, Any] | None:
        return self.kube.find(self.path(name))

    def status(self, name: str = "job") -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def phase_is(self, phase: str, name: str = "job") -> Callable[[], bool]:
        return lambda: self.status(name).get("phase") == phase

    def patch_spec(self, spec: dict[str, Any], name: str = "job") -> dict[str, Any]:
        return dict(self.kube.patch(self.path(name), {"spec": spec}))

    def scale(self, replicas: int, name: str = "job") -> dict[str, Any]:
        return dict(self.kube.patch(self.path(name) + "/scale", {"spec": {"replicas": replicas}}))

    def events(self, name: str = "job") -> list[str]:
        """The job's Events, found by the server's field selector."""
        items = self.kube.list(ns_path(self.namespace, "events"),
                               fieldSelector=f"involvedObject.kind=LLMTrainingJob,involvedObject.name={name}")
        return [f"{e.get('reason')}: {e.get('message')}" for e in items]

    def has_event(self, prefix: str, name: str = "job") -> Callable[[], bool]:
        return lambda: any(e.startswith(prefix) for e in self.events(name))


# --- the operator in this process -----------------------------------------------------------------------


def fast_config(**planner: Any) -> Any:
    from kubetrain_operator.controller import OperatorConfig

    planner = {"below_min_grace_seconds": 1.0, "failed_group_grace_seconds": 1, "held_pod_seconds": 1.0, **planner}
    return OperatorConfig(planner=PlannerConfig(**planner),
                          resync_seconds=0.5, progress_interval_seconds=0.1, progress_timeout_seconds=0.5,
                          expectation_seconds=5.0, error_backoff_seconds=0.1, audit_seconds=1.0)


class _NotTheOperators(collections.abc.Container):  # type: ignore[type-arg]
    def __init__(self, before: Iterable[asyncio.Task[Any]]):
        self.before = set(before)

    def __contains__(self, task: object) -> bool:
        if task in self.before or not isinstance(task, asyncio.Task):
            return True
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        return "aiohttp" in filename or "pytest_asyncio" in filename or filename == __file__


@contextlib.asynccontextmanager
async def running_operator(namespace: str, config: Any = None) -> AsyncIterator[Any]:
    """The real operator (all its Kopf handlers) in this event loop, as `kubetrain operator -n NAMESPACE`
    runs it, against $KUBECONFIG; yields the Kopf memo (memo.runtime is the operator's Runtime)."""
    import kopf
    from kubetrain_operator import handlers

    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    memo = kopf.Memo(config=config or fast_config())
    stop, ready = asyncio.Event(), asyncio.Event()
    # kopf.operator() = spawn_tasks + run_tasks; at exit, run_tasks waits for (then cancels) every task
    # started since, which here includes the tests' own (a /progress server, the played kubelet): leave those.
    foreign = _NotTheOperators(asyncio.all_tasks())
    tasks = await kopf.spawn_tasks(settings=settings, namespaces=[namespace], standalone=True,
                                   stop_flag=stop, ready_flag=ready, memo=memo)
    task = asyncio.ensure_future(kopf.run_tasks(tasks, ignored=foreign))
    try:
        await wait_until(lambda: ready.is_set() or task.done(), what="the operator to start")
        if task.done():
            task.result()
        yield memo
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=20)
        except asyncio.TimeoutError:
            # Kopf may respawn a job's daemons for an event it handles while stopping; it then
            # cancels them as "hung" and re-raises the TimeoutError of that escalation. Only that is
            # tolerated: a stop that does not finish at all fails the test (the outer wait_for).
            if not task.done():
                raise
