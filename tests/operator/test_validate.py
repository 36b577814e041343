"""validate.py: a job's spec and name checked beyond what the CRD's schema can express; over arbitrary input
(Hypothesis) it never raises, and the planner fails an invalid job (InvalidSpec) naming the field, with no pods."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_operator.planner import plan
from kubetrain_operator.pod_template import PRIVILEGED, PodSecurity
from kubetrain_operator.validate import unsplittable_sizes_warning, validate_job
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


# --- pod security: what a job creator may ask of the pods the operator's own account creates ----------------

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "hostNetwork": ({"hostNetwork": True}, "spec.workers.podTemplate.hostNetwork"),
    "hostIPC": ({"hostIPC": True}, "spec.workers.podTemplate.hostIPC"),
    "shareProcessNamespace": ({"shareProcessNamespace": True}, "spec.workers.podTemplate.shareProcessNamespace"),
    "privileged": ({"containerSecurityContext": {"privileged": True}},
                   "spec.workers.podTemplate.containerSecurityContext.privileged"),
    "capabilities": ({"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
                     "spec.workers.podTemplate.containerSecurityContext.capabilities.add (['SYS_ADMIN'])"),
    "hostPath": ({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
                 "spec.workers.podTemplate.volumes[0].hostPath ('/')"),
    "init privileged": ({"initContainers": [{"name": "i", "image": "x", "securityContext": {"privileged": True}}]},
                        "spec.workers.podTemplate.initContainers[0].securityContext.privileged"),
    "init hostPort": ({"initContainers": [{"name": "i", "image": "x", "ports": [{"containerPort": 1,
                                                                                "hostPort": 22}]}]},
                      "spec.workers.podTemplate.initContainers[0].ports[0].hostPort"),
    "seccomp": ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
                "spec.workers.podTemplate.securityContext.seccompProfile.type"),
    "selinux": ({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}},
                "spec.workers.podTemplate.securityContext.seLinuxOptions"),
    "procMount": ({"containerSecurityContext": {"procMount": "Unmasked"}},
                  "spec.workers.podTemplate.containerSecurityContext.procMount"),
    "serviceAccountName": ({"serviceAccountName": "deployer"},
                           "spec.workers.podTemplate.serviceAccountName ('deployer')"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_would_give_a_job_creator_the_node_is_refused_naming_the_field_and_the_switch(case: str) -> None:
    template, field = REFUSED[case]
    p = plan(job_view(spec_dict(workers={"podTemplate": template})), {}, [], NOW)
    assert p.phase == "Failed" and not p.create and p.status_patch["reason"] == "InvalidSpec"
    assert field in p.status_patch["message"] and "podSecurity." in p.status_patch["message"]
    assert validate_job("job", spec_dict(workers={"podTemplate": template}), PodSecurity(PRIVILEGED)).error is None


def test_what_baseline_allows_passes() -> None:
    """Root in a container with no added capabilities, dropping capabilities, adding one the runtime grants
    anyway, and init containers of any image (spec.image already picks any image)."""
    template = {"securityContext": {"runAsUser": 0, "seccompProfile": {"type": "RuntimeDefault"}},
                "containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                                             "allowPrivilegeEscalation": False, "privileged": False},
                "initContainers": [{"name": "fetch", "image": "amazon/aws-cli:2.22.35"}],
                "volumes": [{"name": "d", "emptyDir": {}}, {"name": "p", "persistentVolumeClaim": {"claimName": "c"}}]}
    assert validate_job("job", spec_dict(workers={"podTemplate": template}), PodSecurity()).error is None


def test_the_administrator_allows_host_paths_service_accounts_and_capabilities_by_name() -> None:
    security = PodSecurity.from_env({"KUBETRAIN_OPERATOR_ALLOWED_HOST_PATHS": "/data/, /corpora",
                                     "KUBETRAIN_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": "s3-reader",
                                     "KUBETRAIN_OPERATOR_ALLOWED_CAPABILITIES": "IPC_LOCK"})

    def error(**template: Any) -> str | None:
        return validate_job("job", spec_dict(workers={"podTemplate": template}), security).error

    assert error(volumes=[{"name": "d", "hostPath": {"path": "/data/sets"}}]) is None
    assert error(volumes=[{"name": "d", "hostPath": {"path": "/corpora"}}]) is None
    for path in ("/database", "/data/../etc", "data", "/"):
        assert "hostPath" in (error(volumes=[{"name": "d", "hostPath": {"path": path}}]) or ""), path
    assert error(serviceAccountName="s3-reader") is None and error(serviceAccountName="admin")
    assert error(containerSecurityContext={"capabilities": {"add": ["IPC_LOCK"]}}) is None
    assert error(containerSecurityContext={"capabilities": {"add": ["CAP_SYS_ADMIN"]}})
    anyone = PodSecurity.from_env({"KUBETRAIN_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": "*"})
    assert validate_job("job", spec_dict(workers={"podTemplate": {"serviceAccountName": "x"}}), anyone).error is None


def test_an_unknown_security_level_refuses_every_job_and_says_how_to_fix_it() -> None:
    error = validate_job("job", spec_dict(), PodSecurity.from_env({"KUBETRAIN_OPERATOR_POD_SECURITY": "open"})).error
    assert error and "KUBETRAIN_OPERATOR_POD_SECURITY ('open') must be baseline or privileged" in error


def test_the_default_comes_from_the_operators_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    template = {"hostNetwork": True}
    assert validate_job("job", spec_dict(workers={"podTemplate": template})).error
    monkeypatch.setenv("KUBETRAIN_OPERATOR_POD_SECURITY", "privileged")
    assert validate_job("job", spec_dict(workers={"podTemplate": template})).error is None


# --- names and ports that would make the pods' creation fail ----------------------------------------------

@pytest.mark.parametrize(("name", "spec", "expected"), [
    ("my.job", {}, "metadata.name ('my.job') must start with a letter and hold only lower-case letters"),
    ("job", {"metrics": {"port": 29400}}, "spec.metrics.port (29400) is the workers' rendezvous port"),
    ("job", {"s3": {"credentialsSecret": "S3_Creds"}}, "spec.s3.credentialsSecret ('S3_Creds') is not a Secret"),
    ("job", {"workers": {"podTemplate": {"volumes": [{"name": "kubetrain-config", "emptyDir": {}}]}}},
     "spec.workers.podTemplate.volumes[0].name ('kubetrain-config') is used twice"),
    ("job", {"workers": {"podTemplate": {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}}},
     "spec.workers.podTemplate.volumes[1].name ('a') is used twice"),
    ("job", {"workers": {"podTemplate": {"volumeMounts": [{"name": "a", "mountPath": "/etc/kubetrain/"}]}}},
     "spec.workers.podTemplate.volumeMounts[0].mountPath ('/etc/kubetrain/') is where the operator mounts"),
])
def test_names_and_ports_the_api_server_would_refuse_in_the_pod_are_invalid_specs(
        name: str, spec: dict[str, Any], expected: str) -> None:
    p = plan(job_view(spec_dict(**spec), name=name), {}, [], NOW)
    assert p.phase == "Failed" and not p.create and p.status_patch["reason"] == "InvalidSpec"
    assert expected in p.status_patch["message"], p.status_patch["message"]


# --- bounded work per job: the shared operator validates every job at every reconcile and progress poll ----

def test_the_sizes_the_batch_does_not_split_over_are_one_bounded_warning() -> None:
    result = validate_job("job", spec_dict(workers={"nodes": 1, "maxNodes": 10_000},
                                           training={"globalBatchSize": 720720, "microBatchSize": 1}))
    (split,) = [w for w in result.warnings if "does not split" in w]
    assert split.startswith("with 17, 19, 23, 25, 27, 29, 31..32, 34 nodes (17, 19, 23, 25, 27, 29, 31..32, 34 "
                            "processes) and at 9793 other sizes up to 10000 the batch does not split")
    assert len(split) < 1000 and len(result.warnings) <= 3


@settings(max_examples=200, deadline=None)
@given(low=st.integers(1, 12), extra=st.integers(0, 12), proc=st.integers(1, 4), micro=st.integers(1, 4),
       batch=st.integers(1, 96))
def test_the_summarised_sizes_are_exactly_those_the_batch_does_not_split_over(
        low: int, extra: int, proc: int, micro: int, batch: int) -> None:
    raw = spec_dict(workers={"nodes": low, "minNodes": low, "maxNodes": low + extra, "procPerNode": proc},
                    training={"globalBatchSize": batch, "microBatchSize": micro})
    result = validate_job("job", raw)
    if result.spec is None or result.size_only:
        return
    bad = [n for n in range(low + 1, low + extra + 1) if result.spec.training.batch_layout_error(n * proc)]
    warning = unsplittable_sizes_warning(result.spec)
    assert (warning is None) == (not bad)
    if warning is not None:  # at most 12 sizes: every range is listed
        listed = warning.removeprefix("with ").split(" nodes (")[0].split(", ")
        sizes = [n for r in listed for n in range(int(r.split("..")[0]), int(r.split("..")[-1]) + 1)]
        assert sizes == bad
