"""The operator process's lifecycle (runner.py), through its real entry point `kubetrain operator` as a
subprocess: it refuses to start on a bad kubeconfig or an unreachable cluster with one line and a non-zero
exit (no tracebacks, no process left doing nothing), and on a clean shutdown it removes Kopf's finalizer
from its jobs, so a job deleted while no operator runs (after `helm uninstall`) goes away, and its namespace
with it, instead of staying Terminating for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster.client import Kube
from kubetrain_api.manifest import GROUP
from support import free_port, wait_for
from support.operator import Jobs

FINALIZER = f"{GROUP}/finalizer"


def operator_command(namespace: str, kubeconfig: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)  # outside a pod, as `kubetrain operator` on a laptop
    argv = [sys.executable, "-m", "kubetrain_cli", "operator", "-n", namespace,
            "--metrics-port", str(free_port()), "--liveness-port", "0"]
    return argv, env


NOT_A_KUBECONFIG = "just: some\nyaml: [that, is, not, a, kubeconfig]\n"
NOTHING_LISTENS = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:PORT", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    (NOT_A_KUBECONFIG, "cannot load Kubernetes credentials from"),
    (NOTHING_LISTENS, "did not answer"),
], ids=["missing", "not-a-kubeconfig", "nothing-listens"])
def test_a_bad_kubeconfig_exits_non_zero_with_one_line(tmp_path: Path, content: str | None, says: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_text(content.replace("PORT", str(free_port())))
    argv, env = operator_command("default", kubeconfig)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetrain operator: ") and says in lines[0], done.stderr[-2000:]


def test_a_job_deleted_after_the_operator_stopped_goes_away(kube: Kube, namespace: str, control_plane: Any,
                                                            llmtrainingjob_crd: str, tmp_path: Path) -> None:
    jobs = Jobs(kube, namespace)
    argv, env = operator_command(namespace, Path(control_plane.kubeconfig))
    with (tmp_path / "operator.log").open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # suspended: no pods, so nothing but the finalizer can hold the deletion up
            jobs.create(jobs.manifest(runPolicy={"suspend": True}))
            wait_for(lambda: FINALIZER in ((jobs.get() or {}).get("metadata") or {}).get("finalizers", []),
                     timeout=60, what="Kopf's finalizer on the job")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = (tmp_path / "operator.log").read_text()
    assert FINALIZER not in (jobs.get() or {}).get("metadata", {}).get("finalizers", []), output[-3000:]
    kube.delete(jobs.path("job"))
    wait_for(lambda: jobs.get() is None, timeout=30, what="the job to be gone with no operator running")
    assert "Traceback" not in output, output[-3000:]


def test_the_uninstall_hook_stops_the_operator_and_releases_the_jobs(kube: Kube, namespace: str, control_plane: Any,
                                                                     llmtrainingjob_crd: str) -> None:
    """`kubetrain operator-uninstall` (the chart's pre-delete hook): the operator's Deployment scaled to 0, and
    the finalizer a killed replica left on a job removed, so the job can be deleted with no operator."""
    deployments = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    labels = {"app": "operator"}
    kube.create(deployments, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kubetrain-operator"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            # never scheduled: the replicas stay Pending, as good as running for the scale-down
            "spec": {"nodeSelector": {"kubetrain.io/nowhere": "true"},
                     "containers": [{"name": "operator", "image": "ghcr.io/kubetrain/operator:0.1.0"}]}}}})
    wait_for(lambda: (kube.get(f"{deployments}/kubetrain-operator").get("status") or {}).get("replicas") == 2,
             timeout=60, what="the Deployment's two replicas")
    jobs = Jobs(kube, namespace)
    manifest = jobs.manifest(runPolicy={"suspend": True})
    manifest["metadata"]["finalizers"] = [FINALIZER]  # what a replica killed with SIGKILL leaves
    jobs.create(manifest)
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig), "POD_NAMESPACE": namespace}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run([sys.executable, "-m", "kubetrain_cli", "operator-uninstall", "-n", namespace,
                           "--deployment", "kubetrain-operator", "--timeout", "60"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stopped; removed the finalizer from 1 more jobs" in done.stdout, done.stdout
    assert kube.get(f"{deployments}/kubetrain-operator")["spec"]["replicas"] == 0
    kube.delete(jobs.path("job"))
    wait_for(lambda: jobs.get() is None, timeout=30, what="the job to be gone with no operator running")
