"""controller.py: the expectations that cover the watch's lag after the operator's own creations and
deletions, and the operator's settings from its environment."""

from __future__ import annotations

from kubetrain_operator.controller import Expectations, OperatorConfig
from support.operator import pod


def test_expectations_cover_the_watch_lag() -> None:
    exp = Expectations(ttl=5)
    mine = pod(1, "Pending", uid="new")
    exp.created[mine.name] = (mine, 100.0)
    exp.deleted["old0"] = 100.0
    seen = exp.merge([pod(0, uid="old0")], 101.0)
    assert {p.name: p.terminating for p in seen} == {"job-worker-0": True, "job-worker-1": False}
    assert {p.name for p in exp.merge([pod(1, uid="new")], 102.0)} == {"job-worker-1"}
    assert not exp.created and not exp.deleted  # seen by the watch: forgotten


def test_operator_settings_from_the_environment() -> None:
    config = OperatorConfig.from_env({"KUBETRAIN_OPERATOR_RESYNC_SECONDS": "5",
                                      "KUBETRAIN_OPERATOR_BELOW_MIN_GRACE_SECONDS": "60",
                                      "KUBETRAIN_OPERATOR_FAILED_GROUP_GRACE_SECONDS": "5"})
    assert config.resync_seconds == 5.0 and config.planner.below_min_grace_seconds == 60.0
    assert config.planner.failed_group_grace_seconds == 5 and config.planner.max_backoff_seconds == 600
