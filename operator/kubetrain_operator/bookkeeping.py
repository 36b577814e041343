"""The planner's bookkeeping in the job's own status (so a restarted operator continues exactly): parsing
it robustly, the conditions, and the JSON merge patches between the old status and the new."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetrain_api.status import CONDITION_TYPES, PHASES

from .coerce import as_count, as_dict, is_digits
from .timeutil import iso, parse_time

# The status fields the planner writes (the rest, progress and checkpoint, are the progress loop's).
OWNED = ("phase", "reason", "message", "conditions", "workers", "restarts", "startTime", "completionTime",
         "observedGeneration", "selector", "tracking")


@dataclass
class Bookkeeping:
    """The planner's view of status, robust to anything a user or an older operator wrote there."""

    phase: str | None
    reason: str | None
    message: str | None
    conditions: list[dict[str, Any]]
    restarts: int
    start_time: float | None
    completion_time: float | None
    launched: int
    replacing: dict[str, str]
    last_failure: float | None
    below_min_since: float | None
    restart_time: float | None
    full_restart: bool
    resizing: bool
    step_time: float | None

    @classmethod
    def parse(cls, status: Any) -> Bookkeeping:
        s = as_dict(status)
        t = as_dict(s.get("tracking"))
        phase = s.get("phase") if s.get("phase") in PHASES else None
        return cls(
            phase=phase,
            reason=s.get("reason") if isinstance(s.get("reason"), str) else None,
            message=s.get("message") if isinstance(s.get("message"), str) else None,
            conditions=[c for c in s.get("conditions") or [] if isinstance(c, dict) and isinstance(c.get("type"), str)]
            if isinstance(s.get("conditions"), list) else [],
            restarts=as_count(s.get("restarts")) or 0,
            start_time=parse_time(s.get("startTime")),
            completion_time=parse_time(s.get("completionTime")),
            launched=as_count(t.get("launched")) or 0,
            replacing={k: v for k, v in as_dict(t.get("replacing")).items() if is_digits(k) and isinstance(v, str)},
            last_failure=parse_time(t.get("lastFailureTime")),
            below_min_since=parse_time(t.get("belowMinSince")),
            restart_time=parse_time(t.get("restartTime")),
            full_restart=t.get("fullRestart") is True,
            resizing=t.get("resizing") is True,
            step_time=parse_time(as_dict(s.get("progress")).get("stepTime")),
        )


def update_conditions(previous: list[dict[str, Any]], phase: str, reason: str, message: str,
                      now: float) -> list[dict[str, Any]]:
    """One condition per phase type: True for the current phase, False for the others once they existed."""
    by_type = {c["type"]: c for c in previous}
    out = []
    for kind in CONDITION_TYPES:
        old = by_type.get(kind)
        status = "True" if kind == phase else "False"
        if old is None and status == "False":
            continue
        if old is not None and old.get("status") == status and (status == "False" or (
                old.get("reason") == reason and old.get("message") == message)):
            out.append(old)
            continue
        changed = old is None or old.get("status") != status
        out.append({"type": kind, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": iso(now) if changed or old is None else old.get("lastTransitionTime")})
    return out


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new` (dicts recurse; None deletes)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) else value
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """`target` with the JSON merge patch applied, as the API server does (what the status becomes)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out
