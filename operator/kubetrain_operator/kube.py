"""The few Kubernetes API calls the operator makes, over kubernetes_asyncio without model decoding.

Responses are read as JSON (decoding into generated models costs more than the request), creates
tolerate AlreadyExists, deletes tolerate NotFound, and every patch says its Content-Type: a dict body
to kubernetes_asyncio's patch_* is otherwise sent as application/json-patch+json, which a real API
server rejects (400) for a merge-style body.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubetrain_api.manifest import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
RETRYABLE = (429, 500, 502, 503, 504)


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(f"{status} {reason}: {message}".rstrip(": "))
        self.status, self.reason, self.message = status, reason, message


class Kube:
    def __init__(self, api_client: client.ApiClient, concurrency: int = 64, retries: int = 4):
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self._limit = asyncio.Semaphore(concurrency)
        self._retries = retries

    @classmethod
    async def connect(cls, concurrency: int = 64) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            # kubernetes_asyncio reads $KUBECONFIG once, at import; read it now.
            await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
        cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, concurrency)
        return cls(client.ApiClient(cfg), concurrency)

    async def close(self) -> None:
        await self.api.close()

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        delay = 0.2
        for attempt in range(self._retries + 1):
            async with self._limit:
                try:
                    resp = await method(*args, _preload_content=False, **kwargs)
                except ApiException as exc:  # raised by kubernetes_asyncio for transport-level failures
                    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
                    status, text = exc.status or 0, str(body or exc.reason or "")
                else:
                    try:
                        status, text = resp.status, await resp.text()
                    finally:
                        resp.release()
            if 200 <= status < 300:
                return json.loads(text) if text else {}
            if status not in RETRYABLE or attempt == self._retries:
                raise _error(status, text)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

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


def _error(status: int, text: str) -> KubeError:
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    return KubeError(status, str(data.get("reason") or "Error"), str(data.get("message") or text[:300]))
