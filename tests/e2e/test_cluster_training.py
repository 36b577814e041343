"""Real training on the test bed: the operator (a `kubetrain operator` process) on the real control
plane, worker pods on the local nodes running real torchrun + trainer processes from this checkout,
data, tokenizer and checkpoints on S3 (moto, bound to the bridge's host address so pods reach it).

Kept few and short (a tiny model, tens of steps): the slow part is each pod's Python start-up.
Fixtures: tests/e2e/conftest.py; the helpers: tests/support/bed.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cluster.client import Kube
from support import TEST_MODEL, wait_for
from support.bed import (
    BUCKET,
    JOBS,
    apply,
    diagnose,
    long_job_at_step,
    manifest,
    progress_step,
    secret,
    status,
    wait_or_explain,
    workers,
)
from support.s3 import MotoServer, objects

pytestmark = pytest.mark.slow


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
