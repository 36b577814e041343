"""Worker 0's `GET /progress` → status.progress and status.checkpoint (the parsing is pure)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp

from .timeutil import iso, iso_precise, parse_time

_NUMBERS = ("loss", "evalLoss", "tokensPerSecond", "mfu", "etaSeconds")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None  # Kubernetes JSON has no NaN/inf


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value >= 0 else None


def progress_patch(status: Any, data: Any, now: float) -> dict[str, Any]:
    """The merge patch that brings status.progress/checkpoint up to `data` (empty: nothing new).
    progress.stepTime moves only when the step changes: the planner's stall detection reads it."""
    if not isinstance(data, dict) or _count(data.get("step")) is None:
        return {}
    status = status if isinstance(status, dict) else {}
    old = status.get("progress") if isinstance(status.get("progress"), dict) else {}
    step = _count(data.get("step"))
    new: dict[str, Any] = {"step": step, "maxSteps": _count(data.get("maxSteps"))}
    for key in _NUMBERS:
        new[key] = _number(data.get(key))
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
    if isinstance(ckpt, dict) and _count(ckpt.get("step")) is not None:
        when = parse_time(ckpt.get("time"))
        new_ckpt = {"step": _count(ckpt.get("step")),
                    "uri": ckpt.get("uri") if isinstance(ckpt.get("uri"), str) else None,
                    "time": iso(when) if when is not None else None}
        old_ckpt = status.get("checkpoint") if isinstance(status.get("checkpoint"), dict) else {}
        changed = {k: v for k, v in new_ckpt.items() if old_ckpt.get(k) != v and v is not None}
        if changed:
            patch["checkpoint"] = changed
    return patch


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
