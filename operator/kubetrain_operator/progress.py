"""Worker 0's `GET /progress` → status.progress and status.checkpoint (the parsing is pure)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from kubetrain_api.contract import PROGRESS_NUMBERS

from .coerce import as_count, as_dict, as_number
from .timeutil import iso, iso_precise, parse_time


def progress_patch(status: Any, data: Any, now: float) -> dict[str, Any]:
    """The merge patch that brings status.progress/checkpoint up to `data` (empty: nothing new).
    progress.stepTime moves only when the step changes: the planner's stall detection reads it."""
    if not isinstance(data, dict) or as_count(data.get("step"), floats=True) is None:
        return {}
    status = as_dict(status)
    old = as_dict(status.get("progress"))
    step = as_count(data.get("step"), floats=True)
    new: dict[str, Any] = {"step": step, "maxSteps": as_count(data.get("maxSteps"), floats=True)}
    for key in PROGRESS_NUMBERS:
        new[key] = readable(key, as_number(data.get(key)))
    phase = data.get("phase")
    new["phase"] = phase[:64] if isinstance(phase, str) else None
    updated = parse_time(data.get("updatedAt"))
    new["updatedAt"] = iso_precise(updated) if updated is not None else None
    new["stepTime"] = old.get("stepTime") if old.get("step") == step and old.get("stepTime") else iso_precise(now)
    patch: dict[str, Any] = {}
    progress = {k: v for k, v in new.items() if old.get(k) != v and not (v is None and k not in old)}
    if progress:
        patch["progress"] = progress
    ckpt = data.get("checkpoint")
    if isinstance(ckpt, dict) and as_count(ckpt.get("step"), floats=True) is not None:
        when = parse_time(ckpt.get("time"))
        new_ckpt = {"step": as_count(ckpt.get("step"), floats=True),
                    "uri": ckpt.get("uri") if isinstance(ckpt.get("uri"), str) else None,
                    "time": iso(when) if when is not None else None}
        old_ckpt = as_dict(status.get("checkpoint"))
        changed = {k: v for k, v in new_ckpt.items() if old_ckpt.get(k) != v and v is not None}
        if changed:
            patch["checkpoint"] = changed
    return patch


def readable(key: str, value: float | None) -> float | int | None:
    """What a person reads in `kubectl get ltj` and in status: losses and MFU to 4 significant digits, rates
    and seconds as whole numbers (the trainer reports them at full float precision)."""
    if value is None:
        return None
    if key in ("tokensPerSecond", "etaSeconds"):
        return round(value)
    return float(f"{value:.4g}")


async def fetch_progress(session: aiohttp.ClientSession, url: str, timeout: float) -> dict[str, Any] | None:
    """The JSON at `url`, or None when it does not answer 200 with a JSON object in time."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            data = json.loads(await resp.read())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None
