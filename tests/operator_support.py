"""Helpers for the operator tests: specs, pods, an in-memory cluster for the planner, and a Kubernetes
emulator (kmock) completed with what a real API server does that the operator relies on."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import copy
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from kubetrain_operator.pods import ObservedPod
from kubetrain_operator.reconcile import JobView, Plan, PlannerConfig, apply_merge_patch, plan
from kubetrain_operator.render import JobRef
from kubetrain_operator.validate import validate_job


def spec_dict(**sections: Any) -> dict[str, Any]:
    """A small valid LLMTrainingJob spec; keyword arguments deep-merge into it."""
    spec: dict[str, Any] = {
        "image": "kubetrain/trainer:test",
        "model": {"preset": "tiny"},
        "tokenizer": {"path": "/data/tokenizer"},
        "data": {"train": "/data/train", "validation": "/data/validation", "seqLength": 64},
        "training": {"maxSteps": 100, "globalBatchSize": 16, "microBatchSize": 2},
        "checkpoint": {"uri": "/checkpoints/job"},
        "workers": {"nodes": 2, "procPerNode": 1},
        "runPolicy": {"maxRestarts": 3, "restartBackoffSeconds": 10},
    }
    merge(spec, sections)
    return spec


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def job_view(spec: Any, name: str = "job", namespace: str = "default", uid: str = "uid-job",
             generation: int = 1) -> JobView:
    checked = validate_job(name, spec)
    return JobView(JobRef(name, namespace, uid), checked.spec, checked.error, checked.warnings, generation,
                   checked.size_only)


def pod(index: int, phase: str = "Running", *, job: str = "job", uid: str | None = None, **fields: Any) -> ObservedPod:
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
    _uids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _last_spec: Any = None

    def step(self, advance: float = 0.0) -> Plan:
        self.now += advance
        if self._last_spec is not None and self._last_spec != self.spec:
            self.generation += 1  # as the API server does when the spec changes
        self._last_spec = copy.deepcopy(self.spec)
        view = job_view(self.spec, generation=self.generation)
        p = plan(view, copy.deepcopy(self.status), list(self.pods.values()), self.now, self.cfg)
        self.status = apply_merge_patch(self.status, copy.deepcopy(p.status_patch))
        for d in p.delete:
            victim = next(x for x in self.pods.values() if x.name == d.name)
            if self.graceful and not d.force:
                self.pods[victim.index] = replace(victim, terminating=True, deletion_time=self.now)
            else:
                del self.pods[victim.index]
        for i in p.create:
            assert i not in self.pods, f"created worker {i} over an existing pod"
            self.pods[i] = pod(i, "Pending", uid=f"uid-{i}-{next(self._uids)}")
            self.created += 1
        self.plans.append(p)
        return p

    def set(self, index: int, phase: str, **fields: Any) -> None:
        self.pods[index] = replace(self.pods[index], phase=phase, **fields)

    def run_all(self) -> None:
        for i in list(self.pods):
            self.set(i, "Running", ready=True)

    def gone(self, index: int) -> None:
        del self.pods[index]

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def restarts(self) -> int:
        return int(self.status.get("restarts", 0))

    def events(self, reason: str | None = None) -> list[str]:
        return [f"{e.reason}: {e.message}" for p in self.plans for e in p.events
                if reason is None or e.reason == reason]


async def wait_until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `condition` (sync or async) every 20 ms until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def cancelled_on_exit(coro: Awaitable[Any]) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# --- the Kubernetes emulator ----------------------------------------------------------------------------

import datetime as _dt  # noqa: E402
import uuid  # noqa: E402

import jsonpatch  # noqa: E402
import kmock  # noqa: E402
from kmock._internal import enums as _kmock_enums  # noqa: E402

NS = "ml"
JOBS_URL = f"/apis/kubetrain.io/v1alpha1/namespaces/{NS}/llmtrainingjobs"
PODS_URL = f"/api/v1/namespaces/{NS}/pods"
JOBS = "kubetrain.io/v1alpha1/llmtrainingjobs"
MERGE = {"Content-Type": "application/merge-patch+json"}


class Cluster(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server adds and the operator relies on: metadata.uid,
    creationTimestamp, generation and resourceVersion, generateName, generation bumped when a job's spec
    changes, the scale subresource mapped to spec.workers.nodes, 422 for a stale JSON-patch test, no
    stale versions in a watch stream; and failures injected into pod creations (to stop the operator in
    the middle of creating a job's pods)."""

    http: Any = None  # the tests' own client session
    fail_pods_after: int | None = None  # pod creations beyond this many get 503
    pods_seen: int = 0
    versions: int = 0

    async def _handle(self, request: Any) -> Any:
        writes = (_kmock_enums.action.CREATE, _kmock_enums.action.UPDATE)
        if request.resource is not None and request.action in writes:
            if request.action == _kmock_enums.action.UPDATE and isinstance(request.data, dict):
                self._check_precondition(request)
            self.versions += 1
            if isinstance(request.data, list):  # a JSON patch (Kopf's finalizers test resourceVersion)
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(self.versions)})
            elif isinstance(request.data, dict):
                request.data.setdefault("metadata", {})["resourceVersion"] = str(self.versions)
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == _kmock_enums.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("creationTimestamp", _dt.datetime.now(_dt.timezone.utc).isoformat())
                meta.setdefault("namespace", request.namespace)
                meta.setdefault("generation", 1)
                if str(request.resource) == "v1/pods" or getattr(request.resource, "plural", None) == "pods":
                    self.pods_seen += 1
                    if self.fail_pods_after is not None and self.pods_seen > self.fail_pods_after:
                        raise kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="injected")
            elif request.action == _kmock_enums.action.UPDATE and request.subresource == "scale":
                # What the API server does with the CRD's scale subresource: replicas → spec.workers.nodes.
                replicas = data.get("spec", {}).get("replicas")
                data.clear()
                data["spec"] = {"workers": {"nodes": replicas}}
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = str(self.versions)
            if request.action == _kmock_enums.action.UPDATE and request.subresource in (None, "scale") \
                    and "spec" in data:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = dict(self.objects[key]).get("metadata", {}).get("generation", 1)
                    meta["generation"] = int(current) + 1
            if not data.get("metadata"):
                data.pop("metadata", None)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:  # a stale resourceVersion: 422 as from a real server
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc


    def _check_precondition(self, request: Any) -> None:
        """A merge patch that names metadata.resourceVersion applies only to that version (409 otherwise),
        as on a real API server: what leader election relies on."""
        wanted = (request.data.get("metadata") or {}).get("resourceVersion")
        key = (request.resource, request.namespace, request.name)
        if wanted is None or key not in self.objects or self.objects[key].deleted:
            return
        current = dict(self.objects[key]).get("metadata", {}).get("resourceVersion")
        if str(wanted) != str(current):
            raise kmock.KubernetesError(status=409, reason="Conflict",
                                        message=f"the object has been modified ({wanted} != {current})")


def declare_resources(cluster: kmock.KubernetesEmulator) -> None:
    cluster.resources.load_bundled()
    cluster.resources[JOBS] = kmock.ResourceInfo(
        kind="LLMTrainingJob", singular="llmtrainingjob", namespaced=True, shortnames={"ltj", "llmjob"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"}, subresources={"status", "scale"})


def write_kubeconfig(path: Any, url: Any) -> None:
    path.write_text(f"""
apiVersion: v1
kind: Config
current-context: emulator
clusters:
  - name: emulator
    cluster: {{server: "{str(url).rstrip('/')}"}}
users:
  - name: emulator
    user: {{token: test}}
contexts:
  - name: emulator
    context: {{cluster: emulator, user: emulator, namespace: {NS}}}
""")


FAST = None  # set below (imports kopf-free controller config)


def fast_config(**planner: Any) -> Any:
    from kubetrain_operator.controller import OperatorConfig

    return OperatorConfig(planner=PlannerConfig(**{"below_min_grace_seconds": 1.0, **planner}),
                          resync_seconds=0.5, progress_interval_seconds=0.1, progress_timeout_seconds=0.5,
                          expectation_seconds=5.0, error_backoff_seconds=0.1)


class _NotTheOperators(collections.abc.Container):  # type: ignore[type-arg]
    def __init__(self, before: Iterable[asyncio.Task[Any]]):
        self.before = set(before)

    def __contains__(self, task: object) -> bool:
        if task in self.before or not isinstance(task, asyncio.Task):
            return True
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        return "aiohttp" in filename or "kmock" in filename or "pytest_asyncio" in filename


@contextlib.asynccontextmanager
async def running_operator(config: Any = None, namespaces: tuple[str, ...] = (NS,)) -> AsyncIterator[Any]:
    """The real operator (all its Kopf handlers) in this event loop, as `kubetrain operator` runs it;
    yields the Kopf memo (memo.runtime is the operator's Runtime)."""
    import kopf
    from kubetrain_operator import handlers

    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    settings.scanning.disabled = True  # no CRD/namespace discovery against the emulator
    memo = kopf.Memo(config=config or fast_config())
    stop, ready = asyncio.Event(), asyncio.Event()
    # kopf.operator() = spawn_tasks + run_tasks; at exit, run_tasks waits for (then cancels) every task
    # started since, which here includes the emulator's own request handlers: leave those alone.
    foreign = _NotTheOperators(asyncio.all_tasks())
    tasks = await kopf.spawn_tasks(settings=settings, namespaces=list(namespaces), standalone=True,
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
