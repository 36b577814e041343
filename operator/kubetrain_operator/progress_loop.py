"""The per-job progress loop (a Kopf daemon, handlers.py): worker 0's /progress (any worker that answers, worker 0
first) into status.progress and status.checkpoint, and when it last answered (Runtime.progress_read: stall
detection concludes nothing from progress it could not read). The only writer of those two status fields."""

from __future__ import annotations

import logging
import time
from typing import Any

from kubetrain_api.contract import PROGRESS_PATH
from kubetrain_api.status import RESTARTING, RUNNING

from .controller import Flag, JobKey, Runtime
from .progress import fetch_progress, progress_patch
from .validate import validate_job


async def progress_loop(rt: Runtime, body: Any, stopped: Flag, index: Any,
                        logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    meta = body.get("metadata") or {}
    key: JobKey = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
    answered: str | None = None  # the pod that served /progress last (global rank 0)
    while not stopped:
        try:
            answered = await poll_progress(rt, body, index, key, answered)
        except Exception as exc:
            rt.metrics.errors.labels(kind="progress").inc()
            logger.warning("progress update failed: %r", exc)
        await stopped.wait(rt.config.progress_interval_seconds)


async def poll_progress(rt: Runtime, body: Any, index: Any, key: JobKey, answered: str | None) -> str | None:
    status = body.get("status") or {}
    if status.get("phase") not in (RUNNING, RESTARTING):
        return answered
    spec = validate_job(key[1], body.get("spec")).spec  # (a size-only error still has a readable spec)
    if spec is None or not spec.metrics.port:
        return answered
    pods = [p for p in (index.get(key, []) if index is not None else [])
            if p.ip and p.phase == "Running" and not p.terminating]
    pods.sort(key=lambda p: (p.name != answered, p.index))  # worker 0 first, or whoever answered before
    for pod in pods:
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        data = await fetch_progress(rt.session, f"http://{host}:{spec.metrics.port}{PROGRESS_PATH}",
                                    rt.config.progress_timeout_seconds)
        if data is None:
            continue
        rt.metrics.progress_reads.labels(result="ok").inc()
        if rt.progress_read.get(key) is None:
            rt.wake(*key)  # ProgressKnown turns True
        rt.progress_read[key] = time.time()
        patch = progress_patch(status, data, time.time())
        if patch:
            await rt.kube.patch_job_status(key[0], key[1], patch)
        return pod.name
    rt.metrics.progress_reads.labels(result="unanswered").inc()
    return answered
