"""Shared fixtures: the real demo corpus (fetched once into the cache), a small prepared dataset
and tokenizer, and helpers that run the real `kubetrain` CLI and `torchrun` as subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, wait_for
from support.runs import KUBETRAIN


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    from kubetrain_trainer.preparation import resolve_inputs

    return resolve_inputs("corpus://shakespeare", "data.train")


@pytest.fixture(scope="session")
def small_corpus(corpus_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten plays in a directory of their own."""
    d = tmp_path_factory.mktemp("corpus")
    for f in corpus_files[:10]:
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def prepared(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kubetrain prepare` output (train/, validation/, tokenizer/) with a 512-token BPE."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    result = subprocess.run([*KUBETRAIN, "prepare", "--input", str(small_corpus), "--train-tokenizer", "512",
                             "--validation-split", "0.2", "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


# --- the real control plane (tests/cluster) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real kube-apiserver + etcd + controller manager + scheduler, started once per test run. Skips
    where the binaries are absent, except with CI=true, where that fails the run."""
    from cluster.controlplane import ControlPlane, missing_assets

    why = missing_assets()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs the control plane: {why}", pytrace=False)
        pytest.skip(why)
    plane = ControlPlane.start(tmp_path_factory.mktemp("k8s"))
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube(control_plane: Any) -> Any:
    """The admin client (system:masters) of the control plane."""
    from cluster.client import Kube

    client = Kube(control_plane.kubeconfig)
    yield client
    client.close()


@pytest.fixture
def namespace(kube: Any, request: pytest.FixtureRequest) -> Any:
    """A namespace of the test's own (deleted afterwards; the namespace controller removes its objects)."""
    import re
    import uuid

    short = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = f"{short}-{uuid.uuid4().hex[:5]}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods can be created once the serviceaccount controller has made the namespace's default account.
    wait_for(lambda: kube.find(f"/api/v1/namespaces/{name}/serviceaccounts/default"), timeout=60,
             what=f"ServiceAccount {name}/default")
    yield name
    kube.delete(f"/api/v1/namespaces/{name}")


# --- the operator on the real control plane: its CRD, a node the tests play kubelet for --------------------


@pytest.fixture(scope="session")
def llmtrainingjob_crd(control_plane: Any, kube: Any) -> Any:
    """manifests/crd.yaml applied as a user would (`kubectl apply`), Established and served."""
    from cluster.client import kubectl

    kubectl(control_plane.kubeconfig, "apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
    name = "llmtrainingjobs.kubetrain.io"

    def established() -> bool:
        crd = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        return any(c["type"] == "Established" and c["status"] == "True" for c in
                   (crd.get("status") or {}).get("conditions") or [])

    wait_for(established, timeout=60, what=f"CRD {name} Established")
    wait_for(lambda: kube.find("/apis/kubetrain.io/v1alpha1/llmtrainingjobs") is not None, timeout=60,
             what="the LLMTrainingJob API served")
    return name


@pytest.fixture(scope="session")
def llmtrainingjob_gc(llmtrainingjob_crd: str, kube: Any) -> None:
    """Until the garbage collector collects what an LLMTrainingJob owns. It learns of a new CRD at its next
    discovery sync (every 30 s); a dependent whose owner it cannot map waits for that, as on any cluster.
    Probes: a job owning a ConfigMap (in a namespace of their own) is deleted, until its ConfigMap goes too."""
    import functools

    from cluster.client import ns_path

    ns = "kubetrain-gc-probe"
    if kube.find(f"/api/v1/namespaces/{ns}") is None:
        kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    jobs = ns_path(ns, "llmtrainingjobs", group="kubetrain.io", version="v1alpha1")

    def absent(path: str) -> bool:
        return kube.find(path) is None

    deadline = time.monotonic() + 90
    while True:
        job = kube.create(jobs, {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                                 "metadata": {"generateName": "gc-probe-"}, "spec": {"data": {"train": "/d"}}})
        owner = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob", "name": job["metadata"]["name"],
                 "uid": job["metadata"]["uid"]}
        cm = kube.create(ns_path(ns, "configmaps"), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": job["metadata"]["name"], "ownerReferences": [owner]}})
        kube.delete(f"{jobs}/{job['metadata']['name']}")
        dependent = ns_path(ns, "configmaps", cm["metadata"]["name"])
        try:
            wait_for(functools.partial(absent, dependent), timeout=3, what="the probe collected")
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


@pytest.fixture(scope="session")
def played_node(kube: Any) -> Any:
    """A Ready Node (kept so by heartbeats) the scheduler binds the operator tests' pods to; no kubelet."""
    from support.operator import PlayedNode

    node = PlayedNode(kube).start()
    yield node
    node.stop()


@pytest.fixture
def played_kubelet(kube: Any, namespace: str, played_node: Any, llmtrainingjob_crd: str) -> Any:
    """The kubelet's part for the test's namespace (support.operator.PlayedKubelet); afterwards it releases
    the jobs' finalizers and removes the pods, so the namespace can go."""
    from support.operator import PlayedKubelet

    kubelet = PlayedKubelet(kube, namespace)
    yield kubelet
    kubelet.clear()


@pytest.fixture(scope="session")
def local_cluster(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The control plane plus a bridge network and two local nodes (`node-a`, `node-b`) that run bound
    pods as processes; the trainer and operator images are this checkout's .venv."""
    from cluster.bed import LocalCluster

    bed = LocalCluster.start(control_plane, tmp_path_factory.mktemp("nodes"))
    try:
        yield bed
    finally:
        bed.stop()
