"""validate.py: a job's spec and name checked beyond what the CRD's schema can express; over arbitrary input
(Hypothesis) it never raises, and the planner fails an invalid job (InvalidSpec) naming the field, with no pods."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_operator.planner import plan
from kubetrain_operator.validate import validate_job
from support import spec_dict
from support.operator import job_view

NOW = 1_000_000.0


@settings(max_examples=200, deadline=None)
@given(raw=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["data", "workers", "nodes", "training", "podTemplate", "x", "runPolicy"]),
                            inner, max_size=4), max_leaves=12))
def test_validation_never_raises(raw: Any) -> None:
    result = validate_job("job", raw)
    assert (result.spec is None) == (result.error is not None) or result.size_only


def test_elastic_sizes_the_batch_does_not_split_over_are_warned() -> None:
    result = validate_job("job", spec_dict(workers={"nodes": 4, "minNodes": 3, "maxNodes": 4},
                                           training={"globalBatchSize": 16}))
    assert result.error is None and any("with 3 nodes (3 processes)" in w for w in result.warnings)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"workers": {"nodes": 2, "minNodes": 3, "maxNodes": 2}}, "spec.workers.minNodes (3) must not exceed"),
    ({"workers": {"podTemplate": {"containers": []}}}, "spec.workers.podTemplate.containers: not supported"),
    ({"workers": {"podTemplate": {"tolerations": {"key": "x"}}}}, "spec.workers.podTemplate.tolerations: must be a"),
    ({"training": {"globalBatchSize": 16, "microBatchSize": 16}}, "must divide the per-process batch"),
    ({"model": {"preset": "gpt-5"}}, "spec.model.preset: Input should be"),
    ({"data": None}, "spec.data"),
])
def test_invalid_specs_fail_with_the_field_named_and_no_pods(spec: dict[str, Any], expected: str) -> None:
    p = plan(job_view(spec_dict(**spec)), {}, [], NOW)
    assert p.phase == "Failed" and not p.create
    assert p.status_patch["reason"] == "InvalidSpec" and expected in p.status_patch["message"]


def test_job_names_that_cannot_name_a_service_or_hostname_are_invalid() -> None:
    long = "a" * 60
    assert "too long for worker hostnames" in (plan(job_view(spec_dict(), name=long), {}, [], NOW).status_patch[
        "message"])
    assert "must start with a letter" in plan(job_view(spec_dict(), name="7b"), {}, [], NOW).status_patch["message"]
