"""bookkeeping.py: the planner's bookkeeping in the job's own status: parsing whatever is there, the
conditions and their transition times, and the JSON merge patch from the old status to the new (none when
nothing changed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kubetrain_operator.bookkeeping import apply_merge_patch, merge_patch, update_conditions
from kubetrain_operator.planner import plan
from support import spec_dict
from support.operator import Sim, failed, job_view

NOW = 1_000_000.0


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    first = update_conditions([], "Running", "WorkersRunning", "2/2", 100.0)
    assert update_conditions(first, "Running", "WorkersRunning", "2/2", 200.0) == first
    later = update_conditions(first, "Succeeded", "Completed", "done", 300.0)
    assert [(c["type"], c["status"]) for c in later] == [("Running", "False"), ("Succeeded", "True")]
    assert later[0]["lastTransitionTime"] != first[0]["lastTransitionTime"]


def test_no_status_write_when_nothing_changed(started: Callable[..., Sim]) -> None:
    sim = started()
    assert sim.step(1).status_patch == {}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=10)


@given(old=st.dictionaries(st.text(max_size=4), json_values, max_size=5),
       new=st.dictionaries(st.text(max_size=4), json_values.filter(lambda v: v is not None), max_size=5))
def test_merge_patch_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    def no_nulls(v: Any) -> Any:
        return {k: no_nulls(x) for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    new = no_nulls(new)
    assert apply_merge_patch(old, merge_patch(old, new)) == new


def test_garbage_status_is_tolerated() -> None:
    garbage = {"phase": 3, "restarts": "x", "conditions": "no", "tracking": {"replacing": [1], "launched": -4},
               "startTime": {"a": 1}}
    p = plan(job_view(spec_dict()), garbage, [failed(0, uid="u0")], NOW)
    assert p.phase in ("Pending", "Restarting", "Running")
