"""The real operator (Kopf handlers, daemons, API client) in-process against a real Kubernetes
control plane (tests/cluster: kube-apiserver, etcd, controller manager, scheduler). The CRD is the generated
manifests/crd.yaml; the scheduler binds worker pods to a Node that the test keeps Ready, and the test plays
that node's kubelet (support.operator.PlayedKubelet): it writes pod status and finishes graceful deletions.

This file: invalid specs: those only the operator can reject (InvalidSpec, naming the field; the next job
is still served), and those the API server refuses at create and `kubectl apply` time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.client import ApiError, kubectl
from support import wait_until
from support.operator import Jobs, PlayedKubelet, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("kubeconfig")]
Launched = Callable[..., Awaitable[None]]  # tests/operator/conftest.py: launched


# What the CRD's schema and CEL rules cannot express, the operator checks: such a job is accepted by the API
# server and failed by the operator, naming the field. (What the schema can express: the next test.)
OPERATOR_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "batch": ({"training": {"globalBatchSize": 16, "microBatchSize": 16}, "workers": {"nodes": 2}},
              "spec.training.microBatchSize (16) must divide the per-process batch"),
    "template": ({"workers": {"podTemplate": {"containers": [{"name": "sidecar"}]}}},
                 "spec.workers.podTemplate.containers: not supported"),
    "9lives": ({}, "metadata.name ('9lives') must start with a letter"),
    # The server allows dots in a custom object's name, not in the Service named after it (a 422 per retry)
    "my.job": ({}, "metadata.name ('my.job') must start with a letter and hold only lower-case letters"),
    "port": ({"metrics": {"port": 29400}}, "spec.metrics.port (29400) is the workers' rendezvous port"),
}


async def test_invalid_specs_fail_without_pods_and_the_next_job_runs(jobs: Jobs, kubelet: PlayedKubelet,
                                                                     launched: Launched, namespace: str) -> None:
    async with running_operator(namespace):
        for name, (spec, _) in OPERATOR_REJECTS.items():
            jobs.create(jobs.manifest(name, **spec))
        for name, (_, expected) in OPERATOR_REJECTS.items():
            await wait_until(jobs.phase_is("Failed", name), what=f"{name} Failed")
            st = jobs.status(name)
            assert st["reason"] == "InvalidSpec" and expected in st["message"], st
            assert not kubelet.pods(name)
        await launched(jobs.manifest("good"), running=False)  # and the next job is served


# The API server itself refuses these at create or apply time (the CRD's structural schema, its
# x-kubernetes-validations, strict field validation): the operator never sees them.
SERVER_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "below-min": ({"workers": {"nodes": 2, "minNodes": 3, "maxNodes": 4}},
                  "spec.workers: Invalid value: workers.nodes must not be below workers.minNodes"),
    "above-max": ({"workers": {"nodes": 4, "maxNodes": 3}}, "workers.nodes must not exceed workers.maxNodes"),
    "preset": ({"model": {"preset": "gpt-5"}}, "spec.model.preset: Unsupported value: \"gpt-5\""),
    "type": ({"training": {"maxSteps": "many"}}, "spec.training.maxSteps: Invalid value: \"string\""),
    "minimum": ({"workers": {"nodes": 0}}, "spec.workers.nodes: Invalid value: 0"),
}


@pytest.mark.parametrize("case", list(SERVER_REJECTS))
async def test_the_api_server_rejects_what_the_crd_schema_forbids(jobs: Jobs, case: str) -> None:
    spec, expected = SERVER_REJECTS[case]
    with pytest.raises(ApiError) as err:
        jobs.create(jobs.manifest(case, **spec))
    assert err.value.status == 422 and expected in err.value.message, err.value.message
    assert jobs.get(case) is None


async def test_kubectl_apply_rejects_a_malformed_manifest(jobs: Jobs, kubeconfig: Path, tmp_path: Path) -> None:
    not_a_mapping = {**jobs.manifest("junk"), "spec": "not a mapping"}
    typo = jobs.manifest("typo")
    typo["spec"]["training"]["maxStep"] = typo["spec"]["training"].pop("maxSteps")
    no_spec = {k: v for k, v in jobs.manifest("bare").items() if k != "spec"}
    for manifest, expected in ((not_a_mapping, "spec: Invalid value: \"string\""),
                               (typo, "unknown field \"spec.training.maxStep\""),
                               (no_spec, "spec: Required value")):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
        result = await asyncio.to_thread(kubectl, kubeconfig, "apply", "-f", str(tmp_path / "job.yaml"), check=False)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert jobs.get(manifest["metadata"]["name"]) is None
