"""Worker 0's `GET /progress`, or its final report, → status.progress, status.checkpoint and status.checkpoints
(pure; the GET itself is controller.fetch_progress).

The final report is in an ended worker 0's termination message. The planner reads it from the pod while
the pod is in the index; a pod that ends and is removed before a reconcile sees it (a suspend, a deletion)
leaves its report with the controller (`report_to_keep`), which applies it once (`gone_report_patch`).

`fetch_progress` is the GET itself, bounded: whatever a pod serves on its metrics port is read by the operator that
serves every job, from the operator's network position."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from kubetrain_api.contract import CHECKPOINT_CATALOGUE_MAX, PROGRESS_NUMBERS
from kubetrain_api.manifest import MAX_URI

from .coerce import as_count, as_dict, as_list, as_number
from .pods import ObservedPod
from .render import JobRef, pod_name
from .timeutil import iso, iso_precise, parse_time

# The trainer's reply is about 1 KB (contract.PROGRESS_KEYS and a catalogue of CHECKPOINT_CATALOGUE_MAX entries).
MAX_PROGRESS_BYTES = 16 * 1024


async def fetch_progress(session: aiohttp.ClientSession, url: str, timeout: float) -> dict[str, Any] | None:
    """The JSON object at `url`, or None when it does not answer 200 with one in time. At most
    MAX_PROGRESS_BYTES are read; a redirect is not followed (it could point the operator anywhere) and a
    compressed body is not inflated (a small gzip body can inflate to gigabytes): both count as no answer."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                               auto_decompress=False, headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status != 200 or resp.headers.get("Content-Encoding", "identity").lower() != "identity":
                return None
            if (resp.content_length or 0) > MAX_PROGRESS_BYTES:
                return None
            body = await resp.content.read(MAX_PROGRESS_BYTES + 1)
            if len(body) > MAX_PROGRESS_BYTES:
                return None
            data = json.loads(body)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def progress_patch(status: Any, data: Any, now: float) -> dict[str, Any]:
    """The merge patch that brings status.progress/checkpoint/checkpoints up to `data` (empty: nothing new)."""
    if not isinstance(data, dict) or as_count(data.get("step"), floats=True) is None:
        return {}
    status = as_dict(status)
    patch: dict[str, Any] = {}
    progress = _progress_changes(as_dict(status.get("progress")), data, now)
    if progress:
        patch["progress"] = progress
    checkpoint = checkpoint_entry(data.get("checkpoint"))
    if checkpoint is not None:
        old = as_dict(status.get("checkpoint"))
        changed = {k: v for k, v in checkpoint.items() if old.get(k) != v and v is not None}
        if changed:
            patch["checkpoint"] = changed
    listed = catalogue(data.get("checkpoints"))
    if listed and listed != status.get("checkpoints"):  # (empty: a trainer still starting says nothing yet)
        patch["checkpoints"] = listed  # a merge patch replaces a list whole
    return patch


def _progress_changes(old: dict[str, Any], data: dict[str, Any], now: float) -> dict[str, Any]:
    """status.progress's fields that `data` changes. stepTime moves only when the step changes: the
    planner's stall detection reads it."""
    step = as_count(data.get("step"), floats=True)
    new: dict[str, Any] = {"step": step, "maxSteps": as_count(data.get("maxSteps"), floats=True)}
    for key in PROGRESS_NUMBERS:
        new[key] = readable(key, as_number(data.get(key)))
    phase = data.get("phase")
    new["phase"] = phase[:64] if isinstance(phase, str) else None
    updated = parse_time(data.get("updatedAt"))
    new["updatedAt"] = iso_precise(updated) if updated is not None else None
    new["stepTime"] = old.get("stepTime") if old.get("step") == step and old.get("stepTime") else iso_precise(now)
    return {k: v for k, v in new.items() if old.get(k) != v and not (v is None and k not in old)}


def checkpoint_entry(value: Any) -> dict[str, Any] | None:
    """{step, uri, time} of a checkpoint as the trainer describes it (time: RFC 3339), or None."""
    entry = as_dict(value)
    step = as_count(entry.get("step"), floats=True)
    if step is None:
        return None
    when = parse_time(entry.get("time"))
    uri = entry.get("uri")
    return {"step": step, "uri": uri[:MAX_URI] if isinstance(uri, str) else None,
            "time": iso(when) if when is not None else None}


def catalogue(value: Any) -> list[dict[str, Any]] | None:
    """status.checkpoints from the trainer's catalogue: one entry per step, oldest first, the newest
    CHECKPOINT_CATALOGUE_MAX; None when the trainer sent none (status keeps what it has)."""
    if not isinstance(value, list):
        return None
    entries = {e["step"]: {k: v for k, v in e.items() if v is not None}
               for e in map(checkpoint_entry, value) if e is not None}
    return [entries[step] for step in sorted(entries)[-CHECKPOINT_CATALOGUE_MAX:]]


def _newest_listed(value: Any) -> int | None:
    steps = [as_count(as_dict(e).get("step"), floats=True) for e in as_list(value)]
    return max((s for s in steps if s is not None), default=None)


def final_report_patch(status: Any, report: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """progress_patch for the final report of an ended worker 0 (the last step, evaluation, checkpoint and
    catalogue, which polling /progress may have missed), but only forward: a report older than what status
    shows never moves the step, the checkpoint or the catalogue back."""
    if not report:
        return {}
    old = as_dict(status)
    old_step = as_count(as_dict(old.get("progress")).get("step"), floats=True)
    step = as_count(report.get("step"), floats=True)
    if step is None or (old_step is not None and step < old_step):
        return {}
    stale = []
    old_ckpt = as_count(as_dict(old.get("checkpoint")).get("step"), floats=True)
    ckpt = as_count(as_dict(report.get("checkpoint")).get("step"), floats=True)
    if ckpt is not None and old_ckpt is not None and ckpt < old_ckpt:
        stale.append("checkpoint")
    old_listed, listed = _newest_listed(old.get("checkpoints")), _newest_listed(report.get("checkpoints"))
    if listed is not None and old_listed is not None and listed < old_listed:
        stale.append("checkpoints")
    # What the report does not say (maxSteps, throughput, an evaluation before this run) stays as polled.
    kept = {k: v for k, v in as_dict(old.get("progress")).items() if k in ("maxSteps", "phase", *PROGRESS_NUMBERS)}
    done = {"etaSeconds": 0} if report.get("phase") == "done" else {}
    fresh = {k: v for k, v in report.items() if k not in stale}
    return progress_patch(old, {**kept, **done, **fresh}, now)


def report_to_keep(pod: ObservedPod | None, job: str) -> ObservedPod | None:
    """The pod whose final report the controller keeps for the job's next reconcile: worker 0, named as the
    job names it (labels alone could be copied), with a report (its container has ended)."""
    if pod is None or pod.index != 0 or pod.name != pod_name(JobRef(job, "", ""), 0) or not pod.report:
        return None
    return pod


def gone_report_patch(status: Any, kept: ObservedPod | None, pods: list[ObservedPod], now: float) -> dict[str, Any]:
    """final_report_patch of a kept worker 0 that the reconcile no longer observes (ended and removed before
    a reconcile saw it); one still observed is the planner's to read."""
    if kept is None or any(p.uid == kept.uid for p in pods):
        return {}
    return final_report_patch(status, kept.report, now)


def readable(key: str, value: float | None) -> float | int | None:
    """What a person reads in `kubectl get ltj` and in status: losses, perplexity and MFU to 4 significant
    digits, rates and seconds as whole numbers (the trainer reports them at full float precision)."""
    if value is None:
        return None
    if key in ("tokensPerSecond", "etaSeconds"):
        return round(value)
    return float(f"{value:.4g}")
