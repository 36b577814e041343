"""Fixtures of the end-to-end tests on the test bed: S3 on the bridge holding the prepared data, the CRD,
and `kubetrain operator` as a process on the host serving the test's namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster.client import Kube, kubectl
from support import ROOT, free_port, stop_process
from support.bed import BUCKET
from support.s3 import MotoServer


@pytest.fixture(scope="module")
def bed_s3(local_cluster: Any, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto on the bridge address, holding the prepared data and tokenizer under s3://BUCKET/data/."""
    server = MotoServer(tmp_path_factory.mktemp("moto-bed"), host=local_cluster.network.gateway)
    server.start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(prepared.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(prepared)}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def crd_applied(control_plane: Any, kube: Kube) -> None:
    kubectl(control_plane.kubeconfig, "apply", "--server-side", "--force-conflicts", "-f",
            str(ROOT / "manifests" / "crd.yaml"))
    kubectl(control_plane.kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/llmtrainingjobs.kubetrain.io")


@pytest.fixture
def operator(control_plane: Any, crd_applied: None, namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`kubetrain operator -n NAMESPACE` on the host (admin credentials; the chart test runs it in pods)."""
    log = (tmp_path / "operator.log").open("wb")
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig), "KUBETRAIN_OPERATOR_RESYNC_SECONDS": "1",
           "KUBETRAIN_OPERATOR_PROGRESS_INTERVAL_SECONDS": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "kubetrain_cli", "operator", "-n", namespace,
                             "--metrics-port", str(free_port()), "--liveness-port", "0"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()
