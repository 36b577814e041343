"""Fixtures of the end-to-end tests on the test bed: S3 on the bridge holding the prepared data, the CRD,
and `kubetrain operator` as a process on the host serving the test's namespace."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster.client import Kube
from support import stop_process
from support.bed import apply_crd, start_bed_s3, start_operator
from support.s3 import MotoServer


@pytest.fixture(scope="module")
def bed_s3(local_cluster: Any, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto on the bridge address, holding the prepared data and tokenizer under s3://BUCKET/data/."""
    server = start_bed_s3(local_cluster.network.gateway, prepared, tmp_path_factory.mktemp("moto-bed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def crd_applied(control_plane: Any, kube: Kube) -> None:
    apply_crd(control_plane.kubeconfig)


@pytest.fixture
def operator(control_plane: Any, crd_applied: None, namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`kubetrain operator -n NAMESPACE` on the host (admin credentials; the chart test runs it in pods)."""
    proc, log = start_operator(control_plane.kubeconfig, namespace, tmp_path / "operator.log")
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()
