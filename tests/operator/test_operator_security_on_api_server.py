"""The real operator in-process against a real Kubernetes control plane (tests/cluster), the test playing the
node's kubelet (support.operator.PlayedKubelet), as in test_operator_on_api_server.py.

This file: pod security. The operator's own ServiceAccount creates the workers, so a user whom RBAC gives only
`create llmtrainingjobs` must not get, through a job's podTemplate, a pod RBAC would refuse them: a privileged,
host-network pod with the node's root filesystem (kubetrain_operator.pod_template, docs/operations.md Security)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.client import Kube, kubectl, ns_path
from support import wait_until
from support.operator import Jobs, PlayedKubelet, running_operator

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("kubeconfig")]
USER = "job-creator"  # impersonated by the admin kubeconfig (kubectl --as), as the API server's RBAC sees a user

ESCAPE = {"hostNetwork": True, "containerSecurityContext": {"privileged": True},
          "volumes": [{"name": "node", "hostPath": {"path": "/"}}],
          "volumeMounts": [{"name": "node", "mountPath": "/node"}]}


def grant_create_jobs_only(kube: Kube, namespace: str) -> None:
    kube.create(ns_path(namespace, "roles", group="rbac.authorization.k8s.io", version="v1"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "create-jobs"},
        "rules": [{"apiGroups": ["kubetrain.io"], "resources": ["llmtrainingjobs"], "verbs": ["create", "get"]}]})
    kube.create(ns_path(namespace, "rolebindings", group="rbac.authorization.k8s.io", version="v1"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "create-jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "create-jobs"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]})


async def as_user(kubeconfig: Path, namespace: str, *args: str, manifest: dict[str, Any] | None = None) -> str:
    result = await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, f"--as={USER}", *args, check=False,
                                     input=yaml.safe_dump(manifest) if manifest else None)
    return (result.stdout + result.stderr).strip()


async def test_a_user_who_may_only_create_jobs_gets_no_privileged_pod(
        jobs: Jobs, kubelet: PlayedKubelet, kube: Kube, kubeconfig: Path, namespace: str) -> None:
    grant_create_jobs_only(kube, namespace)
    # RBAC as the API server evaluates it (its authorizer's cache sees the new Role within moments)
    async def may_create_jobs() -> bool:
        return await as_user(kubeconfig, namespace, "auth", "can-i", "create", "llmtrainingjobs.kubetrain.io") == "yes"

    await wait_until(may_create_jobs, what="the RoleBinding in effect")
    assert await as_user(kubeconfig, namespace, "auth", "can-i", "create", "pods") == "no"
    async with running_operator(namespace):
        created = await as_user(kubeconfig, namespace, "create", "-f", "-",
                                manifest=jobs.manifest("escape", workers={"podTemplate": ESCAPE}))
        assert "created" in created, created
        await wait_until(jobs.phase_is("Failed", "escape"), what="escape Failed")
        st = jobs.status("escape")
        assert st["reason"] == "InvalidSpec", st
        for field in ("podTemplate.hostNetwork", "podTemplate.containerSecurityContext.privileged",
                      "podTemplate.volumes[0].hostPath ('/')"):
            assert f"spec.workers.{field}" in st["message"], st["message"]
        assert not kubelet.pods("escape")
        # The same user's ordinary job runs, its pods without the namespace's ServiceAccount token
        assert "created" in await as_user(kubeconfig, namespace, "create", "-f", "-", manifest=jobs.manifest("plain"))
        await wait_until(lambda: len(kubelet.pods("plain")) == 2, what="plain's workers")
        for pod in kubelet.pods("plain").values():
            assert pod["spec"]["automountServiceAccountToken"] is False
            assert not [v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access")], pod["spec"]
        assert not kubelet.pods("escape")
