"""pods.py: a worker Pod as the operator observes it (what the kubelet and the API server write, over
arbitrary input: Hypothesis) and how its end is classified (exit codes → reason, retryable or not)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_operator.pods import classify, observe_pod
from support.operator import pod


def test_observe_pod_reads_what_kubelet_writes() -> None:
    body = {"metadata": {"name": "j-worker-1", "uid": "u", "labels": {"kubetrain.io/replica-index": "1"},
                         "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory", "podIP": "10.0.0.5",
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                           "exitCode": 137, "reason": "OOMKilled", "message": "boom"}}}]}}
    p = observe_pod(body)
    assert p is not None and (p.index, p.uid, p.phase, p.exit_code, p.container_reason) == (
        1, "u", "Failed", 137, "OOMKilled")
    assert p.terminating and p.deletion_time == 1704067200.0 and p.ip == "10.0.0.5"
    waiting = observe_pod({"metadata": {"name": "j-worker-0", "labels": {"kubetrain.io/replica-index": "0"}},
                           "status": {"conditions": [{"type": "PodScheduled", "status": "False",
                                                      "reason": "Unschedulable", "message": "0/3 nodes"}]}})
    assert waiting is not None and waiting.waiting == "Unschedulable: 0/3 nodes"


def test_the_final_report_is_read_apart_from_the_message_for_people() -> None:
    message = 'kubetrain-report: {"step":45,"checkpoint":{"step":45,"uri":"s3://b/45","time":1.0}}\npreempted'
    body = {"metadata": {"name": "j-worker-0", "uid": "u", "labels": {"kubetrain.io/replica-index": "0"}},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": 1, "message": message}}}]}}
    p = observe_pod(body)
    assert p is not None and p.termination_message == "preempted"
    assert p.report == {"step": 45, "checkpoint": {"step": 45, "uri": "s3://b/45", "time": 1.0}}
    assert classify(p).message == "j-worker-0 exited 1: preempted"


@settings(max_examples=200, deadline=None)
@given(body=st.recursive(st.none() | st.integers() | st.text(max_size=6),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                             ["metadata", "status", "labels", "name", "phase", "containerStatuses", "state",
                              "terminated", "exitCode", "kubetrain.io/replica-index", "conditions"]), inner,
                             max_size=4), max_leaves=15))
def test_observe_pod_never_raises(body: Any) -> None:
    observed = observe_pod(body)
    if observed is not None:
        classify(observed)


@pytest.mark.parametrize(("fields", "reason", "retryable"), [
    ({"phase": "Failed", "exit_code": 2}, "ConfigError", False),
    ({"phase": "Failed", "exit_code": 3}, "NonFiniteLoss", False),
    ({"phase": "Failed", "exit_code": 143}, "Preempted", True),
    ({"phase": "Failed", "exit_code": 5}, "StorageUnavailable", True),
    ({"phase": "Failed", "exit_code": 137, "container_reason": "OOMKilled"}, "OOMKilled", True),
    ({"phase": "Failed", "exit_code": 137}, "Signal", True),
    ({"phase": "Failed", "pod_reason": "Evicted"}, "Evicted", True),
    ({"phase": "Failed", "exit_code": 1}, "Error", True),
    ({"phase": "Running", "terminating": True}, "Deleted", True),
    ({"phase": "Succeeded", "exit_code": 0}, "Completed", False),
])
def test_exit_codes_are_classified(fields: dict[str, Any], reason: str, retryable: bool) -> None:
    outcome = classify(pod(0, **fields))
    assert (outcome.reason, outcome.retryable) == (reason, retryable)
