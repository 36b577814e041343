"""Real training on the test bed: the operator (a `kubetrain operator` process) on the real control
plane, worker pods on the local nodes running real torchrun + trainer processes from this checkout,
data, tokenizer and checkpoints on S3 (moto, bound to the bridge's host address so pods reach it).

Kept few and short (a tiny model, tens of steps): the slow part is each pod's Python start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.client import Kube, kubectl
from support import ROOT, TEST_MODEL, free_port, job_manifest, stop_process, wait_for
from support.s3 import CREDENTIALS, MotoServer, objects

pytestmark = pytest.mark.slow
BUCKET = "kubetrain-bed"
JOBS = "/apis/kubetrain.io/v1alpha1/namespaces/{ns}/llmtrainingjobs"


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


def secret(kube: Kube, ns: str) -> str:
    kube.create(f"/api/v1/namespaces/{ns}/secrets", {"apiVersion": "v1", "kind": "Secret",
                                                     "metadata": {"name": "s3-credentials"},
                                                     "stringData": dict(CREDENTIALS)})
    return "s3-credentials"


def manifest(ns: str, name: str, s3: MotoServer, credentials: str, **sections: Any) -> dict[str, Any]:
    """The bed's job (support.job_manifest): TEST_MODEL over the prepared data and tokenizer in S3 for 16 steps on
    two nodes, a checkpoint every 8 under s3://BUCKET/NS/NAME/ and the Hugging Face export; `sections` deep-merged
    in."""
    spec: dict[str, Any] = {
        "image": "ghcr.io/kubetrain/trainer:0.1.0",
        "model": {"preset": "tiny", "config": dict(TEST_MODEL)},
        "tokenizer": {"path": f"s3://{BUCKET}/data/tokenizer/"},
        "data": {"train": f"s3://{BUCKET}/data/train/", "validation": f"s3://{BUCKET}/data/validation/",
                 "seqLength": 64},
        "training": {"maxSteps": 16, "globalBatchSize": 8, "microBatchSize": 4, "precision": "fp32",
                     "optimizer": {"lr": 0.003}, "schedule": {"warmupSteps": 2}, "evalEvery": 8, "evalBatches": 2,
                     "seed": 7},
        "checkpoint": {"uri": f"s3://{BUCKET}/{ns}/{name}/", "everySteps": 8, "keep": 2, "exportHF": True,
                       "preemptionGraceSeconds": 20},
        "s3": {**s3.s3_section(), "credentialsSecret": credentials},
        "workers": {"nodes": 2, "procPerNode": 1},
        "runPolicy": {"maxRestarts": 3, "restartBackoffSeconds": 1},
    }
    return job_manifest(name, ns, spec=spec, **sections)


def apply(control_plane: Any, body: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"{body['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    kubectl(control_plane.kubeconfig, "apply", "-f", str(path))


def job(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return dict(kube.get(JOBS.format(ns=ns) + f"/{name}"))


def status(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return dict(job(kube, ns, name).get("status") or {})


def workers(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return kube.list(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"kubetrain.io/job-name={name}")


def diagnose(local_cluster: Any, kube: Kube, ns: str, name: str, operator_log: Path) -> str:
    """What to read when a wait fails: the job's status, its pods' states and logs, the operator's log."""
    parts = [json.dumps(status(kube, ns, name), indent=1)[-3000:]]
    for p in workers(kube, ns, name):
        parts.append(f"--- {p['metadata']['name']}: {json.dumps(p['status'].get('containerStatuses'))[-800:]}")
        if p["spec"].get("nodeName"):
            parts.append(local_cluster.node(p["spec"]["nodeName"]).logs(ns, p["metadata"]["name"])[-2500:])
    parts.append("--- operator\n" + operator_log.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def wait_or_explain(condition: Any, why: Any, timeout: float, what: str) -> Any:
    """wait_for, failing with the job's status, its pods' logs and the operator's log."""
    try:
        return wait_for(condition, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{why()}") from None


def progress_step(kube: Kube, ns: str, name: str) -> int:
    return int((status(kube, ns, name).get("progress") or {}).get("step") or 0)


def long_job_at_step(local_cluster: Any, kube: Kube, control_plane: Any, ns: str, name: str, s3: MotoServer,
                     tmp_path: Path, step: int, **overrides: Any) -> Any:
    """Apply a job far longer than the test (no periodic checkpoint, no export) and wait until it has
    trained `step` steps; returns the `why` for later waits."""
    body = manifest(ns, name, s3, secret(kube, ns), training={"maxSteps": 2000},
                    checkpoint={"everySteps": 100000, "exportHF": False}, **overrides)
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, name, tmp_path / "operator.log")  # noqa: E731
    wait_or_explain(lambda: progress_step(kube, ns, name) >= step, why, 300, f"training to reach step {step}")
    return why


def test_two_node_job_trains_to_succeeded_with_s3_checkpoints_and_an_export_that_loads(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    ns = namespace
    apply(control_plane, manifest(ns, "tiny", bed_s3, secret(kube, ns)), tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, "tiny", tmp_path / "operator.log")  # noqa: E731
    seen: list[int] = []

    def progressed_or_done() -> bool:
        st = status(kube, ns, "tiny")
        step = (st.get("progress") or {}).get("step")
        if step and st.get("phase") == "Running":
            seen.append(int(step))
        return st.get("phase") in ("Succeeded", "Failed")

    wait_or_explain(progressed_or_done, why, 400, "the job to end")
    st = status(kube, ns, "tiny")
    assert st["phase"] == "Succeeded", why()
    assert seen and 0 < min(seen) <= 16, f"progress while running: {seen}"  # status followed the live trainer
    assert st.get("restarts", 0) == 0
    # The final report in worker 0's termination message brought status to the end, whatever the polls saw
    final = st["progress"]
    assert (final["step"], final.get("phase")) == (final["maxSteps"], "done"), st
    assert final.get("evalLoss") is not None and st["checkpoint"]["step"] == final["step"], st
    # Both workers ran on local nodes with pod IPs of the bridge, as one torchrun group of two
    pods = {p["metadata"]["name"]: p for p in kube.list(f"/api/v1/namespaces/{ns}/pods")}
    assert all(p["spec"].get("nodeName", "").startswith("node-") for p in pods.values())
    # Checkpoints and the Hugging Face export are in S3, and the export loads
    stored = objects(bed_s3.client(), BUCKET, f"{ns}/tiny/")
    assert any(k.endswith("step-000000016/COMMITTED") for k in stored), sorted(stored)
    export = tmp_path / "hf"
    for key in (k for k in stored if "/hf/" in k):
        target = export / key.split("/hf/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        bed_s3.client().download_file(BUCKET, key, str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export))
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert model.config.num_hidden_layers == TEST_MODEL["num_hidden_layers"]
    assert len(tokenizer("to be or not to be")["input_ids"]) > 0


def test_suspend_commits_a_sigterm_checkpoint_and_resume_continues_from_it(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    ns = namespace
    why = long_job_at_step(local_cluster, kube, control_plane, ns, "pausable", bed_s3, tmp_path, 3,
                           workers={"nodes": 1})
    pod = workers(kube, ns, "pausable")[0]["metadata"]["name"]
    node = local_cluster.node_of(kube, ns, pod)
    kube.patch(JOBS.format(ns=ns) + "/pausable", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for(lambda: not workers(kube, ns, "pausable"), timeout=120, what="the suspended job's pods to go")
    committed = sorted(k for k in objects(bed_s3.client(), BUCKET, f"{ns}/pausable/") if k.endswith("/COMMITTED"))
    assert len(committed) == 1, committed  # no periodic checkpoint: this is the SIGTERM one
    step = int(committed[0].split("step-")[1][:9])
    assert step >= 3
    assert f"SIGTERM: checkpoint of step {step} committed" in node.logs(ns, pod)
    assert status(kube, ns, "pausable").get("phase") == "Suspended", why()
    kube.patch(JOBS.format(ns=ns) + "/pausable", {"spec": {"runPolicy": {"suspend": False}}})

    def resumed() -> bool:
        pods = workers(kube, ns, "pausable")
        if not pods or not pods[0]["spec"].get("nodeName"):
            return False
        p = pods[0]
        return f"at step {step}" in local_cluster.node(p["spec"]["nodeName"]).logs(ns, p["metadata"]["name"])

    wait_or_explain(resumed, why, 300, f"the resumed trainer to load step {step}")
    wait_or_explain(lambda: progress_step(kube, ns, "pausable") > step, why, 300, "training to go on after the resume")
    assert status(kube, ns, "pausable").get("restarts", 0) == 0  # a suspend is not a failure


def test_a_worker_killed_with_sigkill_is_recreated_and_counted(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    ns = namespace
    why = long_job_at_step(local_cluster, kube, control_plane, ns, "healing", bed_s3, tmp_path, 2)
    victim = next(p for p in workers(kube, ns, "healing") if p["metadata"]["name"].endswith("-worker-1"))
    old_uid = victim["metadata"]["uid"]
    local_cluster.node(victim["spec"]["nodeName"]).kill(ns, victim["metadata"]["name"], sig=signal.SIGKILL)

    def recreated() -> bool:
        pods = {p["metadata"]["name"]: p for p in workers(kube, ns, "healing")}
        new = pods.get("healing-worker-1")
        return bool(new and new["metadata"]["uid"] != old_uid and new["status"].get("phase") == "Running")

    wait_or_explain(recreated, why, 120, "worker 1 to be recreated and running")
    wait_or_explain(lambda: status(kube, ns, "healing").get("restarts") == 1, why, 60, "one counted restart")
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=healing")
    assert any("137" in (e.get("message") or "") or e.get("reason") == "WorkerFailed" for e in events), \
        [(e.get("reason"), e.get("message")) for e in events]
