"""render.py: an LLMTrainingJob's spec → the objects the operator creates (the headless Service, the
ConfigMap holding the trainer's config, one worker Pod per node running torchrun under the pod entrypoint)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_api.manifest import JobSpec
from kubetrain_operator.render import JobRef, render_objects, render_pod, render_stage_jobs
from support import spec_dict

REF = JobRef("llama", "ml", "uid-1", {"kueue.x-k8s.io/queue-name": "gpus"})


def spec(**sections: Any) -> JobSpec:
    return JobSpec.model_validate(spec_dict(**sections))


def test_worker_pod_runs_torchrun_with_the_contract() -> None:
    s = spec(workers={"nodes": 4, "minNodes": 3, "maxNodes": 4, "procPerNode": 8,
                      "resources": {"limits": {"nvidia.com/gpu": 8}}},
             runPolicy={"maxRestarts": 7}, metrics={"port": 9400}, s3={"credentialsSecret": "s3-creds"})
    p = render_pod(REF, s, 2)
    meta, pod_spec = p["metadata"], p["spec"]
    assert meta["name"] == "llama-worker-2" and meta["namespace"] == "ml"
    assert meta["labels"]["kubetrain.io/job-name"] == "llama" and meta["labels"]["kubetrain.io/replica-index"] == "2"
    assert meta["ownerReferences"] == [{"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                                        "name": "llama", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert (pod_spec["hostname"], pod_spec["subdomain"], pod_spec["restartPolicy"]) == (
        "llama-worker-2", "llama", "Never")
    c = pod_spec["containers"][0]
    cmd = c["command"]
    torchrun = cmd[cmd.index("torchrun"):]
    # The operator restarts and re-sizes the group (runPolicy.maxRestarts is its count), torchrun never
    assert torchrun == ["torchrun", "--nnodes=4:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=llama-worker-0.llama.ml.svc:29400", "--rdzv-id=uid-1", "--max-restarts=0",
                        "-m", "kubetrain_trainer.train", "--config", "/etc/kubetrain/config.json",
                        "--output", "/var/run/kubetrain/output"]
    assert cmd[:3] == ["python", "-m", "kubetrain_trainer.entrypoint"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert pod_spec["terminationGracePeriodSeconds"] == 900 and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "870"
    # Kueue admits the workers as one group.
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpus" and meta["labels"][
        "kueue.x-k8s.io/pod-group-name"] == "llama"
    assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "4"


def test_pod_template_is_merged_in() -> None:
    template = {"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {}}, "securityContext": {"runAsUser": 1000},
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
                            {"name": "shm", "emptyDir": {"medium": "Memory"}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "shm", "mountPath": "/dev/shm"}],
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "PYTHONUNBUFFERED", "value": "0"}],
                "labels": {"team": "llm", "kubetrain.io/job-name": "spoof"}, "terminationGracePeriodSeconds": 120,
                "priorityClassName": "high", "containerSecurityContext": {"allowPrivilegeEscalation": False}}
    p = render_pod(REF, spec(workers={"podTemplate": template}), 0)
    pod_spec, c = p["spec"], p["spec"]["containers"][0]
    assert pod_spec["nodeSelector"] == {"gpu": "h100"} and pod_spec["tolerations"][0]["key"] == "gpu"
    assert pod_spec["securityContext"] == {"runAsUser": 1000} and pod_spec["priorityClassName"] == "high"
    assert [v["name"] for v in pod_spec["volumes"]] == ["kubetrain-config", "kubetrain-output", "data", "shm"]
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/etc/kubetrain", "/var/run/kubetrain/output",
                                                          "/data", "/dev/shm"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["PYTHONUNBUFFERED"] == "0"  # the user's value wins
    assert p["metadata"]["labels"]["team"] == "llm" and p["metadata"]["labels"]["kubetrain.io/job-name"] == "llama"
    assert pod_spec["terminationGracePeriodSeconds"] == 120 and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False}


def test_service_and_configmap() -> None:
    s = spec()
    svc, cm, *pods = render_objects(REF, s)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetrain.io/job-name": "llama"} and svc["metadata"]["name"] == "llama"
    config = json.loads(cm["data"]["config.json"])
    assert config == s.trainer_config().to_wire() and "workers" not in config
    assert [p["metadata"]["name"] for p in pods] == ["llama-worker-0", "llama-worker-1"]


@settings(max_examples=60, deadline=None)
@given(nodes=st.integers(1, 8), extra=st.integers(0, 4), proc=st.integers(1, 8), index=st.integers(0, 11))
def test_rendering_is_deterministic_and_consistent(nodes: int, extra: int, proc: int, index: int) -> None:
    s = spec(workers={"nodes": nodes, "maxNodes": nodes + extra, "procPerNode": proc},
             training={"globalBatchSize": 840 * 8, "microBatchSize": 1})
    a, b = render_pod(REF, s, index), render_pod(REF, s, index)
    assert a == b
    assert f"--nnodes={nodes}:{nodes}" in a["spec"]["containers"][0]["command"]
    assert a["metadata"]["name"] == a["spec"]["hostname"] == f"llama-worker-{index}"
    assert a["metadata"]["annotations"]["kubetrain.io/config-hash"] == render_objects(REF, s)[1]["metadata"][
        "annotations"]["kubetrain.io/config-hash"]


def test_workers_get_no_service_account_token_unless_the_template_names_an_account() -> None:
    """The trainer never calls the API server: the namespace's default token stays out of its pods (and of the
    data preparation's Job pods), unless the job chose a ServiceAccount (e.g. one bound to a cloud IAM role)."""
    raw = {"data": {"train": "s3://b/raw/"}, "tokenizer": {"path": None, "train": {"vocabSize": 512}},
           "checkpoint": {"uri": "s3://b/ckpt/"}}
    s = JobSpec.model_validate(raw)
    pod, (stage, *_) = render_pod(REF, s, 0), render_stage_jobs(REF, s)
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert stage["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    raw["workers"] = {"podTemplate": {"serviceAccountName": "s3-reader"}}
    s = JobSpec.model_validate(raw)
    pod, (stage, *_) = render_pod(REF, s, 0), render_stage_jobs(REF, s)
    assert pod["spec"]["serviceAccountName"] == "s3-reader" and "automountServiceAccountToken" not in pod["spec"]
    assert "automountServiceAccountToken" not in stage["spec"]["template"]["spec"]
