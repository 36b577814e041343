"""Reading JSON that anyone may have written (a user's `kubectl edit`, an older operator, a pod's status,
a trainer's /progress): each helper returns the value when it has the expected type, else an empty value
or None, so the parsers that use them never raise on a malformed body."""

from __future__ import annotations

import math
from typing import Any, TypeGuard


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str | None:
    """A non-empty string, else None (an empty reason or name says nothing)."""
    return value if isinstance(value, str) and value else None


def as_int(value: Any) -> int | None:
    """An int, else None; never a bool (JSON `true` is not a number, though Python's bool is an int)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_count(value: Any, *, floats: bool = False) -> int | None:
    """A non-negative int, else None. floats: a finite non-negative float counts too, cut to an int
    (a /progress reply may come from any JSON encoder); the status the operator writes holds ints only."""
    if floats and isinstance(value, float):
        return int(value) if math.isfinite(value) and value >= 0 else None
    number = as_int(value)
    return number if number is not None and number >= 0 else None


def as_number(value: Any) -> float | None:
    """A finite int or float as a float, else None (Kubernetes JSON has no NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def is_digits(value: Any) -> TypeGuard[str]:
    """A string of ASCII digits 0-9 only: str.isdigit() also takes "²" or "٣", which int() then refuses or reads
    as another number."""
    return isinstance(value, str) and value.isascii() and value.isdigit()
