"""A plain aiohttp client of the API server: what both contenders and the bench's bookkeeping send."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from . import ROOT

CRD = ROOT / "manifests" / "crd.yaml"
CRD_URL = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
STRATEGIC = {"Content-Type": "application/strategic-merge-patch+json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
JOB_LABEL = "kubetrain.io/job-name"


@contextlib.asynccontextmanager
async def session(kubeconfig: Path, concurrency: int) -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session with the kubeconfig's server, credentials and CA."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    headers = {}
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    if token:
        headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
    context: ssl.SSLContext | bool = False
    if str(cfg.host).startswith("https"):
        tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if not cfg.verify_ssl:
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        if cfg.cert_file:
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        context = tls
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base_url=cfg.host, headers=headers, connector=connector,
                                     timeout=timeout) as http:
        yield http


async def check(resp: aiohttp.ClientResponse, *ok: int) -> Any:
    if resp.status not in ok:
        raise RuntimeError(f"{resp.method} {resp.url}: {resp.status} {(await resp.text())[:300]}")
    return await resp.json() if resp.content_type == "application/json" else None


async def get(http: aiohttp.ClientSession, url: str, **params: str) -> Any | None:
    """The object, or None on 404."""
    async with http.get(url, params=params or None) as resp:
        return None if resp.status == 404 else await check(resp, 200)


async def until(what: str, condition: Callable[[], Any], timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)


async def gather_limited(limit: int, coros: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def run(coro: Any) -> Any:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(run(c) for c in coros)))


def pods_url(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods"


def jobs_url(ns: str) -> str:
    return f"/apis/kubetrain.io/v1alpha1/namespaces/{ns}/llmtrainingjobs"


# --- the CRD and the namespaces ----------------------------------------------------------------------------


async def ensure_crd(http: aiohttp.ClientSession) -> bool:
    """Apply manifests/crd.yaml unless the CRD exists; wait until it is Established. True if created here."""
    crd = yaml.safe_load(CRD.read_text())
    url = f"{CRD_URL}/{crd['metadata']['name']}"
    created = False
    if await get(http, url) is None:
        async with http.post(CRD_URL, json=crd) as resp:
            await check(resp, 201, 409)  # 409: someone else applied it meanwhile
            created = resp.status == 201

    async def established() -> bool:
        found = await get(http, url) or {}
        return any(c.get("type") == "Established" and c.get("status") == "True"
                   for c in (found.get("status") or {}).get("conditions") or [])

    await until("CRD Established", established, 60)
    await until("LLMTrainingJobs served", lambda: _served(http), 30)
    return created


async def _served(http: aiohttp.ClientSession) -> bool:
    async with http.get(jobs_url("default"), params={"limit": "1"}) as resp:
        return resp.status == 200


async def delete_crd(http: aiohttp.ClientSession) -> None:
    crd = yaml.safe_load(CRD.read_text())
    async with http.delete(f"{CRD_URL}/{crd['metadata']['name']}") as resp:
        await check(resp, 200, 202, 404)


async def create_namespace(http: aiohttp.ClientSession, ns: str) -> None:
    """A fresh namespace, once its ServiceAccount `default` exists (pods are refused until then)."""
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubetrain.io/bench": "1"}}}
    async with http.post("/api/v1/namespaces", json=body) as resp:
        await check(resp, 201)

    async def has_sa() -> bool:
        return await get(http, f"/api/v1/namespaces/{ns}/serviceaccounts/default") is not None

    await until(f"ServiceAccount {ns}/default", has_sa, 60)


async def delete_namespace(http: aiohttp.ClientSession, ns: str, concurrency: int, timeout: float = 180) -> None:
    """Delete what the bench made in `ns` (jobs' finalizers stripped: no operator is left to remove them),
    then the namespace, and wait until it is gone."""
    found = await get(http, jobs_url(ns)) or {}
    stuck = [j["metadata"]["name"] for j in found.get("items") or [] if j["metadata"].get("finalizers")]

    async def unfinalize(name: str) -> None:
        async with http.patch(f"{jobs_url(ns)}/{name}", json={"metadata": {"finalizers": None}},
                              headers=MERGE) as resp:
            await check(resp, 200, 404)

    await gather_limited(concurrency, [unfinalize(n) for n in stuck])
    for url in (jobs_url(ns), pods_url(ns)):  # (504: the server's 60 s limit; the namespace's deletion goes on)
        async with http.delete(url, params={"gracePeriodSeconds": "0"}) as resp:
            await check(resp, 200, 404, 504)
    async with http.delete(f"/api/v1/namespaces/{ns}") as resp:
        await check(resp, 200, 202, 404)

    async def gone() -> bool:
        return await get(http, f"/api/v1/namespaces/{ns}") is None

    try:
        await until(f"namespace {ns} deleted", gone, timeout, every=0.5)
    except TimeoutError as exc:
        print(f"warning: {exc}", file=sys.stderr)


# --- list-then-watch ---------------------------------------------------------------------------------------


class Watch:
    """A list-then-watch of one collection, kept in `objects` by name: how the bench sees when the pods
    exist and the statuses have converged, timed on the events' arrival (no polling of the operator or LISTs)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, **params: str):
        self.http, self.url, self.params = http, url, params
        self.objects: dict[str, dict[str, Any]] = {}
        self.added = 0  # ADDED events seen after the initial list
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.ended: BaseException | None = None

    async def __aenter__(self) -> Watch:
        listed = await get(self.http, self.url, **self.params) or {}
        self.objects = {o["metadata"]["name"]: o for o in listed.get("items") or []}
        self._task = asyncio.ensure_future(self._run(str((listed.get("metadata") or {}).get("resourceVersion"))))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self, rv: str) -> None:
        try:
            await self._watch(rv)
        except Exception as exc:
            self.ended = exc
            raise
        finally:  # a waiter learns that the watch ended
            self.ended = self.ended or RuntimeError("ended")
            async with self._changed:
                self._changed.notify_all()

    async def _watch(self, rv: str) -> None:
        while True:
            params = {**self.params, "watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true",
                      "timeoutSeconds": "600"}
            async with self.http.get(self.url, params=params,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
                if resp.status != 200:  # (not check(): that reads the whole body, i.e. waits for the watch to end)
                    raise RuntimeError(f"watch {self.url}: {resp.status} {(await resp.text())[:300]}")
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            rv = await self._event(json.loads(line), rv)

    async def _event(self, event: dict[str, Any], rv: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise RuntimeError(f"watch {self.url}: {obj}")
        meta = obj.get("metadata") or {}
        if kind in ("ADDED", "MODIFIED"):
            self.added += kind == "ADDED" and meta["name"] not in self.objects
            self.objects[meta["name"]] = obj
        elif kind == "DELETED":
            self.objects.pop(meta["name"], None)
        async with self._changed:
            self._changed.notify_all()
        return str(meta.get("resourceVersion") or rv)

    async def until(self, condition: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> float:
        """perf_counter() at the event that made `condition(objects)` hold (TimeoutError after `timeout`)."""
        async def wait() -> float:
            async with self._changed:
                while not condition(self.objects):
                    if self.ended is not None:
                        raise RuntimeError(f"watch {self.url} ended: {self.ended!r}")
                    await self._changed.wait()
                return time.perf_counter()

        return await asyncio.wait_for(wait(), timeout)
