"""Worker 0's `GET /progress`, or its final report, → status.progress and status.checkpoint (pure; the GET
itself is controller.fetch_progress)."""

from __future__ import annotations

from typing import Any

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


def final_report_patch(status: Any, report: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """progress_patch for the final report of an ended worker 0 (the last step, evaluation and checkpoint,
    which polling /progress may have missed), but only forward: a report older than what status shows
    never moves the step or the checkpoint back."""
    if not report:
        return {}
    old = as_dict(status)
    old_step = as_count(as_dict(old.get("progress")).get("step"), floats=True)
    step = as_count(report.get("step"), floats=True)
    if step is None or (old_step is not None and step < old_step):
        return {}
    old_ckpt = as_count(as_dict(old.get("checkpoint")).get("step"), floats=True)
    ckpt = as_count(as_dict(report.get("checkpoint")).get("step"), floats=True)
    if ckpt is not None and old_ckpt is not None and ckpt < old_ckpt:
        report = {k: v for k, v in report.items() if k != "checkpoint"}
    # What the report does not say (maxSteps, the last throughput) stays as the last poll saw it.
    kept = {k: v for k, v in as_dict(old.get("progress")).items() if k in ("maxSteps", "tokensPerSecond", "mfu")}
    done = {"etaSeconds": 0} if report.get("phase") == "done" else {}
    return progress_patch(old, {**kept, **done, **report}, now)


def readable(key: str, value: float | None) -> float | int | None:
    """What a person reads in `kubectl get ltj` and in status: losses and MFU to 4 significant digits, rates
    and seconds as whole numbers (the trainer reports them at full float precision)."""
    if value is None:
        return None
    if key in ("tokensPerSecond", "etaSeconds"):
        return round(value)
    return float(f"{value:.4g}")
