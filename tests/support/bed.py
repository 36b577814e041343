"""The end-to-end tests' vocabulary on the test bed: the bed's job manifest, applying it, reading the job,
its status and pods, and waits that fail with the job's status, its pods' logs and the operator's log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import yaml
from cluster.client import Kube, kubectl

from support import ROOT, TEST_MODEL, free_port, job_manifest, wait_for
from support.s3 import CREDENTIALS, MotoServer, objects

BUCKET = "kubetrain-bed"
JOBS = "/apis/kubetrain.io/v1alpha1/namespaces/{ns}/llmtrainingjobs"


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


def ended_recording(kube: Kube, ns: str, name: str, phases: list[str]) -> Any:
    """A wait condition: the job has ended (Succeeded or Failed); every new phase seen is appended to `phases`."""

    def ended() -> bool:
        phase = status(kube, ns, name).get("phase")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        return phase in ("Succeeded", "Failed")

    return ended


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
    body = manifest(ns, name, s3, secret(kube, ns), training={"maxSteps": 2000, "compile": False},
                    checkpoint={"everySteps": 100000, "exportHF": False}, **overrides)
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, name, tmp_path / "operator.log")  # noqa: E731
    wait_or_explain(lambda: progress_step(kube, ns, name) >= step, why, 300, f"training to reach step {step}")
    return why


# --- the bed's servers, for the fixtures (tests/e2e/conftest.py) and bench/elastic_heal.py -------------------
def start_bed_s3(host: str, prepared: Path, workdir: Path) -> MotoServer:
    """moto on `host` (the bridge's address, so pods reach it), holding `prepared` (`kubetrain prepare`
    output) under s3://BUCKET/data/."""
    server = MotoServer(workdir, host=host)
    server.start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(prepared.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(prepared)}")
    return server


def apply_crd(kubeconfig: Path | str) -> None:
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests" / "crd.yaml"))
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "crd/llmtrainingjobs.kubetrain.io")


def start_operator(kubeconfig: Path | str, namespace: str, log_path: Path) -> tuple[subprocess.Popen, IO[bytes]]:
    """`kubetrain operator -n NAMESPACE` on the host (admin credentials; the chart test runs it in pods),
    reconciling and reading progress every second; returns the process and its open log."""
    log = log_path.open("wb")
    # The preparation test mounts the corpus the image would bake from its pytest temporary directory (hostPath).
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETRAIN_OPERATOR_RESYNC_SECONDS": "1",
           "KUBETRAIN_OPERATOR_PROGRESS_INTERVAL_SECONDS": "1",
           "KUBETRAIN_OPERATOR_ALLOWED_HOST_PATHS": tempfile.gettempdir()}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "kubetrain_cli", "operator", "-n", namespace,
                             "--metrics-port", str(free_port()), "--liveness-port", "0"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


# --- restarts and resizes ---------------------------------------------------------------------------------
def committed_steps(s3: MotoServer, ns: str, name: str) -> list[int]:
    """The steps of the job's committed checkpoints in S3, oldest first."""
    keys = objects(s3.client(), BUCKET, f"{ns}/{name}/")
    return sorted(int(k.rsplit("/step-", 1)[1][:9]) for k in keys if k.endswith("/COMMITTED"))


def pod_uids(kube: Kube, ns: str, name: str) -> set[str]:
    return {p["metadata"]["uid"] for p in workers(kube, ns, name)}


def resumed_step(local_cluster: Any, kube: Kube, ns: str, name: str, old: set[str]) -> int | None:
    """The step worker 0 of a group whose pods are none of `old` resumed from, once its log says so."""
    p0 = next((p for p in workers(kube, ns, name) if p["metadata"]["name"] == f"{name}-worker-0"), None)
    if p0 is None or p0["metadata"]["uid"] in old or not p0["spec"].get("nodeName"):
        return None
    log = local_cluster.node(p0["spec"]["nodeName"]).logs(ns, p0["metadata"]["name"], uid=p0["metadata"]["uid"])
    found = re.search(r"resumed from \S+ at step (\d+)", log)
    return int(found.group(1)) if found else None


def advanced(kube: Kube, ns: str, name: str, before: int, resumed: int) -> bool:
    """Whether status shows a step of the relaunched group: past the step it resumed from, and no longer the
    step status showed before the group stopped (what the operator last read from the old group)."""
    step = progress_step(kube, ns, name)
    return step != before and step > resumed
