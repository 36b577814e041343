"""`kubetrain operator-uninstall`: the chart's pre-delete hook, so that `helm uninstall` leaves no job that
cannot be deleted.

Kopf keeps its finalizer on every job while the operator runs (its daemons need it) and leaves it when it
exits; the operator removes it itself on a clean shutdown (runner.py). During `helm uninstall` that is too
late: Helm deletes the ServiceAccount and RBAC together with the Deployment, so the replicas' tokens stop
working before they get SIGTERM. This hook runs first, while all of that still exists, as the operator's
ServiceAccount: it scales the operator's Deployment to 0 (each replica removes the finalizer as it stops),
waits until none is left and the Lease is no longer held, then removes whatever finalizer a replica could
not (one killed, or none running)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from .kube import Kube
from .runner import connect, release_finalizers

log = logging.getLogger(__name__)


async def stopped(kube: Kube, namespace: str, deployment: str, lease: str) -> bool:
    """Whether the Deployment runs no replica any more and no replica holds the Lease."""
    found = await kube.read_deployment(namespace, deployment)
    held = await kube.read_lease(namespace, lease)
    running = int(((found or {}).get("status") or {}).get("replicas") or 0)
    return running == 0 and not ((held or {}).get("spec") or {}).get("holderIdentity")


async def uninstall(namespace: str, deployment: str, lease: str, served: Sequence[str] | None,
                    timeout: float, poll: float = 0.5) -> int:
    """Stop the operator's Deployment and release its jobs (served: the namespaces, None for all); 0 when
    done, 1 when the replicas did not stop within `timeout` (the finalizers are removed either way)."""
    from . import handlers

    kube = await connect()
    try:
        if await kube.read_deployment(namespace, deployment) is not None:
            await kube.scale_deployment(namespace, deployment, 0)
        deadline, done = time.monotonic() + timeout, False
        while not (done := await stopped(kube, namespace, deployment, lease)) and time.monotonic() < deadline:
            await asyncio.sleep(poll)
        released = await release_finalizers(kube, served, handlers.FINALIZER)
        print(f"kubetrain operator-uninstall: {namespace}/{deployment} "
              f"{'stopped' if done else f'still running after {timeout:g}s'}; "
              f"removed the finalizer from {released} more jobs", flush=True)
        return 0 if done else 1
    finally:
        await kube.close()
