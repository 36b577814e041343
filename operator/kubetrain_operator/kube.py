"""The few Kubernetes API calls the operator makes, over kubernetes_asyncio without model decoding.

Responses are read as JSON (decoding into generated models costs more than the request), creates
tolerate AlreadyExists, deletes tolerate NotFound, and every patch says its Content-Type: a dict body
to kubernetes_asyncio's patch_* is otherwise sent as application/json-patch+json, which a real API
server rejects (400) for a merge-style body.

Every call has a timeout (kubernetes_asyncio's default is none at all: a half-open connection would hang
a reconcile forever). A timeout or a connection failure is a KubeError with status 0, not retried here:
the caller's loop retries at its own pace. Watches are Kopf's (handlers.configure sets its timeouts).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubetrain_api.manifest import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
RETRYABLE = (429, 500, 502, 503, 504)
# Seconds: to connect (TCP and TLS), and for a whole request. The API server answers a plain GET in
# milliseconds; writes may wait on admission webhooks (10 s by default each), hence the longer total.
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(f"{status} {reason}: {message}".rstrip(": "))
        self.status, self.reason, self.message = status, reason, message


class Kube:
    def __init__(self, api_client: client.ApiClient, concurrency: int = 64, retries: int = 4,
                 request_timeout: float = REQUEST_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT):
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self._limit = asyncio.Semaphore(concurrency)
        self._retries = retries
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
        self.last_answer = time.monotonic()  # when the API server last answered (any status): /healthz

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    @classmethod
    async def connect(cls, concurrency: int = 64, request_timeout: float = REQUEST_TIMEOUT) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            # kubernetes_asyncio reads $KUBECONFIG once, at import; read it now.
            await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
        cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, concurrency)
        return cls(client.ApiClient(cfg), concurrency, request_timeout=request_timeout)

    async def close(self) -> None:
        await self.api.close()

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        delay = 0.2
        for attempt in range(self._retries + 1):
            async with self._limit:
                try:
                    resp = await method(*args, _preload_content=False, _request_timeout=self._timeout, **kwargs)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # no answer: no status to retry on
                    raise _unanswered(exc, self._timeout.total) from exc
                except ApiException as exc:  # raised by kubernetes_asyncio for transport-level failures
                    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
                    status, text = exc.status or 0, str(body or exc.reason or "")
                else:
                    try:
                        status, text = resp.status, await resp.text()
                    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                        raise _unanswered(exc, self._timeout.total) from exc
                    finally:
                        resp.release()
                if status:
                    self.last_answer = time.monotonic()
            if 200 <= status < 300:
                return json.loads(text) if text else {}
            if status not in RETRYABLE or attempt == self._retries:
                raise _error(status, text)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    async def ping(self) -> dict[str, Any]:
        """GET /version: whether the API server answers, with these credentials (an invalid token is a 401).
        Every client may read it (the built-in system:public-info-viewer role): no RBAC rule needed."""
        return dict(await self._call(client.VersionApi(self.api).get_code))

    # creation and deletion -------------------------------------------------------------------------

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create a Pod, Service, ConfigMap or (data preparation) batch Job; None when it already exists."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        method = {"Pod": self.core.create_namespaced_pod, "Service": self.core.create_namespaced_service,
                  "ConfigMap": self.core.create_namespaced_config_map,
                  "Job": self.batch.create_namespaced_job}[kind]
        try:
            return dict(await self._call(method, ns, obj))
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        """False when it was already gone. Background propagation; grace 0 for pods stuck terminating."""
        kwargs: dict[str, Any] = {"propagation_policy": "Background"}
        if grace_seconds is not None:
            kwargs["grace_period_seconds"] = grace_seconds
        try:
            await self._call(self.core.delete_namespaced_pod, name, namespace, **kwargs)
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    async def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        """The LLMTrainingJobs in `namespace` (None: in every namespace)."""
        if namespace is None:
            found = await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            found = await self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        return list(found.get("items") or [])

    async def remove_job_finalizer(self, namespace: str, name: str, finalizer: str, index: int) -> bool:
        """Remove `finalizer`, found at `index` of the job's finalizers; False when the job is gone or the
        list changed meanwhile (a JSON patch whose `test` fails is a 422, and nothing is written)."""
        path = f"/metadata/finalizers/{index}"
        try:
            await self._call(self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                             [{"op": "test", "path": path, "value": finalizer}, {"op": "remove", "path": path}],
                             _content_type=JSON_PATCH)
            return True
        except KubeError as exc:
            if exc.status in (404, 422):
                return False
            raise

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await self._call(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                             propagation_policy="Background")
        except KubeError as exc:
            if exc.status != 404:
                raise

    # patches -------------------------------------------------------------------------------------------

    async def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge `patch` into the job's .status (the /status subresource takes a whole-object patch)."""
        return dict(await self._call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                                     PLURAL, name, {"status": patch}, _content_type=MERGE_PATCH))

    async def patch_configmap(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call(self.core.patch_namespaced_config_map, name, namespace, patch,
                                     _content_type=MERGE_PATCH))

    # what a job's names hold (controller.py: ownership checks, the audit of the index) --------------------

    def _core(self, verb: str, kind: str) -> Any:
        # (spelled out: tests/chart/test_chart_rbac.py finds the calls in the source and checks the RBAC has them)
        return {("read", "Pod"): self.core.read_namespaced_pod,
                ("read", "Service"): self.core.read_namespaced_service,
                ("read", "ConfigMap"): self.core.read_namespaced_config_map,
                ("patch", "Service"): self.core.patch_namespaced_service,
                ("patch", "ConfigMap"): self.core.patch_namespaced_config_map}[(verb, kind)]

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Pod, Service or ConfigMap; None when there is none of that name."""
        try:
            return dict(await self._call(self._core("read", kind), name, namespace))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch a Service or ConfigMap (a metadata.uid in `patch` is a precondition: 409 otherwise)."""
        return dict(await self._call(self._core("patch", kind), name, namespace, patch, _content_type=MERGE_PATCH))

    async def delete_stage_job(self, namespace: str, name: str) -> None:
        """A data preparation batch Job, with its pods (background propagation); gone already is fine."""
        try:
            await self._call(self.batch.delete_namespaced_job, name, namespace, propagation_policy="Background")
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def list_pod_uids(self, namespace: str, label_selector: str) -> set[str]:
        found = await self._call(self.core.list_namespaced_pod, namespace, label_selector=label_selector)
        return {str(p["metadata"]["uid"]) for p in found.get("items") or []}

    # the chart's pre-delete hook (uninstall.py): the operator's own Deployment -----------------------

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _absent_is_none(self._call(self.apps.read_namespaced_deployment, name, namespace))

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        await self._call(self.apps.patch_namespaced_deployment_scale, name, namespace,
                         {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH)

    # leader election (leader.py): optimistic concurrency through resourceVersion ---------------------

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self._call(self.coordination.read_namespaced_lease, name, namespace))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """None when another candidate created it first."""
        try:
            return dict(await self._call(self.coordination.create_namespaced_lease, namespace, body))
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def patch_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the Lease with `body`, which carries the metadata.resourceVersion that was read: the
        API server applies it only if the Lease is still at that version (409 otherwise: None here)."""
        try:
            return dict(await self._call(self.coordination.patch_namespaced_lease, name, namespace, body,
                                         _content_type=MERGE_PATCH))
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise


async def _absent_is_none(call: Awaitable[Any]) -> dict[str, Any] | None:
    try:
        return dict(await call)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def _unanswered(exc: BaseException, timeout: float | None) -> KubeError:
    if isinstance(exc, TimeoutError):
        return KubeError(0, "Timeout", f"no answer from the API server within {timeout:g}s")
    return KubeError(0, "Unreachable", f"{type(exc).__name__}: {exc}".rstrip(": "))


def _error(status: int, text: str) -> KubeError:
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    return KubeError(status, str(data.get("reason") or "Error"), str(data.get("message") or text[:300]))
