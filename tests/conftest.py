"""Shared fixtures: the real demo corpus (fetched once into the cache), a small prepared dataset
and tokenizer, and helpers that run the real `kubetrain` CLI and `torchrun` as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBETRAIN = [sys.executable, "-m", "kubetrain_cli"]

# A Llama small enough that a step takes milliseconds on one CPU thread.
TEST_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 128}


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


def job_manifest(prepared: Path, name: str = "test-job", **sections: Any) -> dict[str, Any]:
    """A small LLMTrainingJob over the prepared data; keyword arguments deep-merge into spec."""
    spec: dict[str, Any] = {
        "model": {"preset": "tiny", "config": dict(TEST_MODEL)},
        "tokenizer": {"path": str(prepared / "tokenizer")},
        "data": {"train": str(prepared / "train"), "validation": str(prepared / "validation"), "seqLength": 64},
        "training": {"maxSteps": 12, "globalBatchSize": 8, "microBatchSize": 4, "precision": "fp32",
                     "optimizer": {"lr": 0.003}, "schedule": {"warmupSteps": 2}, "evalEvery": 6, "evalBatches": 2,
                     "seed": 7},
        "checkpoint": {"everySteps": 6, "keep": 2, "exportHF": False},
        "workers": {"procPerNode": 1},
        "metrics": {"port": 0},
    }
    _merge(spec, sections)
    return {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob", "metadata": {"name": name},
            "spec": spec}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KUBETRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_events(output: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = output / "events.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [e for e in events if kind is None or e["type"] == kind]


def step_losses(output: Path) -> dict[int, float]:
    """Step → training loss; a step logged again after a resume keeps its newest value."""
    return {e["step"]: e["loss"] for e in read_events(output, "step")}


def wait_for(condition: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def torchrun_cmd(nproc: int, config: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "kubetrain_trainer.train", "--config", str(config), "--output", str(output)]


def kill9_tree(pid: int) -> None:
    """kill -9 a process and all its descendants at once, like a lost node (torchrun's workers run in
    sessions of their own, so killing its process group would miss them)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


def trainer_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


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
    from operator_support import PlayedNode

    node = PlayedNode(kube).start()
    yield node
    node.stop()


@pytest.fixture
def played_kubelet(kube: Any, namespace: str, played_node: Any, llmtrainingjob_crd: str) -> Any:
    """The kubelet's part for the test's namespace (operator_support.PlayedKubelet); afterwards it releases
    the jobs' finalizers and removes the pods, so the namespace can go."""
    from operator_support import PlayedKubelet

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
