"""Spec → objects, the CRD (and its drift), pod observation and classification, /progress parsing, the
pod entrypoint, the CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_api.manifest import JobSpec
from kubetrain_operator.controller import Expectations, OperatorConfig
from kubetrain_operator.crd import build_crd, crd_yaml
from kubetrain_operator.pods import classify, observe_pod
from kubetrain_operator.progress import progress_patch
from kubetrain_operator.render import JobRef, render_objects, render_pod
from kubetrain_operator.validate import validate_job
from kubetrain_trainer import entrypoint
from support import spec_dict
from support.operator import pod

ROOT = Path(__file__).resolve().parents[1]
REF = JobRef("llama", "ml", "uid-1", {"kueue.x-k8s.io/queue-name": "gpus"})


def spec(**sections: Any) -> JobSpec:
    return JobSpec.model_validate(spec_dict(**sections))


# --- spec → objects -----------------------------------------------------------------------------------

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
    assert torchrun == ["torchrun", "--nnodes=3:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=llama-worker-0.llama.ml.svc:29400", "--rdzv-id=uid-1", "--max-restarts=7",
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
    assert f"--nnodes={nodes}:{nodes + extra}" in a["spec"]["containers"][0]["command"]
    assert a["metadata"]["name"] == a["spec"]["hostname"] == f"llama-worker-{index}"
    assert a["metadata"]["annotations"]["kubetrain.io/config-hash"] == render_objects(REF, s)[1]["metadata"][
        "annotations"]["kubetrain.io/config-hash"]


# --- validation -------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(raw=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["data", "workers", "nodes", "training", "podTemplate", "x", "runPolicy"]),
                            inner, max_size=4), max_leaves=12))
def test_validation_never_raises(raw: Any) -> None:
    result = validate_job("job", raw)
    assert (result.spec is None) == (result.error is not None) or result.size_only


def test_elastic_sizes_the_batch_does_not_split_over_are_warned() -> None:
    result = validate_job("job", spec_dict(workers={"nodes": 4, "minNodes": 3, "maxNodes": 4},
                                           training={"globalBatchSize": 16}))
    assert result.error is None and any("with 3 nodes (3 processes)" in w for w in result.warnings)


# --- pods ------------------------------------------------------------------------------------------------

def test_observe_pod_reads_what_kubelet_writes() -> None:
    body = {"metadata": {"name": "j-worker-1", "uid": "u", "labels": {"kubetrain.io/replica-index": "1"},
                         "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory", "podIP": "10.0.0.5",
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                           "exitCode": 137, "reason": "OOMKilled", "message": "boom"}}}]}}
    p = observe_pod(body)
    assert p is not None and (p.index, p.uid, p.phase, p.exit_code, p.container_reason) == (
        1, "u", "Failed", 137, "OOMKilled")
    assert p.terminating and p.deletion_time == 1704067200.0 and p.ip == "10.0.0.5"
    waiting = observe_pod({"metadata": {"name": "j-worker-0", "labels": {"kubetrain.io/replica-index": "0"}},
                           "status": {"conditions": [{"type": "PodScheduled", "status": "False",
                                                      "reason": "Unschedulable", "message": "0/3 nodes"}]}})
    assert waiting is not None and waiting.waiting == "Unschedulable: 0/3 nodes"


@settings(max_examples=200, deadline=None)
@given(body=st.recursive(st.none() | st.integers() | st.text(max_size=6),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                             ["metadata", "status", "labels", "name", "phase", "containerStatuses", "state",
                              "terminated", "exitCode", "kubetrain.io/replica-index", "conditions"]), inner,
                             max_size=4), max_leaves=15))
def test_observe_pod_never_raises(body: Any) -> None:
    observed = observe_pod(body)
    if observed is not None:
        classify(observed)


@pytest.mark.parametrize(("fields", "reason", "retryable"), [
    ({"phase": "Failed", "exit_code": 2}, "ConfigError", False),
    ({"phase": "Failed", "exit_code": 3}, "NonFiniteLoss", False),
    ({"phase": "Failed", "exit_code": 143}, "Preempted", True),
    ({"phase": "Failed", "exit_code": 137, "container_reason": "OOMKilled"}, "OOMKilled", True),
    ({"phase": "Failed", "exit_code": 137}, "Signal", True),
    ({"phase": "Failed", "pod_reason": "Evicted"}, "Evicted", True),
    ({"phase": "Failed", "exit_code": 1}, "Error", True),
    ({"phase": "Running", "terminating": True}, "Deleted", True),
    ({"phase": "Succeeded", "exit_code": 0}, "Completed", False),
])
def test_exit_codes_are_classified(fields: dict[str, Any], reason: str, retryable: bool) -> None:
    outcome = classify(pod(0, **fields))
    assert (outcome.reason, outcome.retryable) == (reason, retryable)


def test_expectations_cover_the_watch_lag() -> None:
    exp = Expectations(ttl=5)
    mine = pod(1, "Pending", uid="new")
    exp.created[mine.name] = (mine, 100.0)
    exp.deleted["old0"] = 100.0
    seen = exp.merge([pod(0, uid="old0")], 101.0)
    assert {p.name: p.terminating for p in seen} == {"job-worker-0": True, "job-worker-1": False}
    assert {p.name for p in exp.merge([pod(1, uid="new")], 102.0)} == {"job-worker-1"}
    assert not exp.created and not exp.deleted  # seen by the watch: forgotten


# --- /progress -------------------------------------------------------------------------------------------

def test_progress_patch_moves_step_time_only_when_the_step_changes() -> None:
    data = {"step": 5, "maxSteps": 10, "loss": float("inf"), "mfu": 0.5, "checkpoint": None, "phase": "training",
            "updatedAt": 100.0}
    first = progress_patch({}, data, 200.0)
    assert first["progress"]["step"] == 5 and "loss" not in first["progress"] and "checkpoint" not in first
    status = {"progress": first["progress"]}
    assert progress_patch(status, data, 300.0) == {}  # nothing new
    moved = progress_patch(status, {**data, "step": 6}, 400.0)
    assert moved["progress"]["step"] == 6 and moved["progress"]["stepTime"] == "1970-01-01T00:06:40.000Z"
    assert progress_patch({}, {"step": "x"}, 1.0) == {} and progress_patch({}, ["nope"], 1.0) == {}


# --- the pod entrypoint ------------------------------------------------------------------------------------

def test_entrypoint_reports_the_trainers_exit_code(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"type": "step", "step": 1}) + "\n")
    offset = events.stat().st_size
    with events.open("a") as f:
        f.write(json.dumps({"type": "error", "message": "spec.data.train: no input files", "exitCode": 2}) + "\n")
    assert entrypoint.trainer_outcome(events, offset, 1, False) == (2, "spec.data.train: no input files")
    assert entrypoint.trainer_outcome(events, events.stat().st_size, 1, False) == (1, None)
    assert entrypoint.trainer_outcome(events, events.stat().st_size, 1, True)[0] == 143
    assert entrypoint.trainer_outcome(tmp_path / "missing", 0, 0, False) == (0, None)


def test_entrypoint_runs_the_command_and_writes_the_termination_message(tmp_path: Path) -> None:
    script = ("import json,sys; open(sys.argv[1],'a').write(json.dumps({'type':'error','message':'bad seed',"
              "'exitCode':2})+'\\n'); sys.exit(1)")
    log = tmp_path / "termination-log"
    code = entrypoint.main(["--output", str(tmp_path), "--termination-log", str(log), "--",
                            sys.executable, "-c", script, str(tmp_path / "events.jsonl")])
    assert code == 2 and log.read_text() == "bad seed"


# --- the CRD -------------------------------------------------------------------------------------------------

def _walk(schema: dict[str, Any], path: str = "") -> list[str]:
    missing = [] if schema.get("description") or path in ("", ".metadata") else [path]
    for name, sub in (schema.get("properties") or {}).items():
        missing += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict) and schema["items"].get("properties"):
        missing += _walk(schema["items"], f"{path}[]")
    return missing


def test_crd_has_status_scale_columns_and_a_description_on_every_field() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["ltj", "llmjob"] and crd["spec"]["scope"] == "Namespaced"
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.workers.nodes",
                                               "statusReplicasPath": ".status.workers.active",
                                               "labelSelectorPath": ".status.selector"}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Nodes", "Step", "Loss", "Tokens/s", "Restarts", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    spec_props = schema["properties"]["spec"]["properties"]
    assert spec_props["model"]["properties"]["preset"]["enum"][0] == "tiny"
    assert spec_props["training"]["properties"]["maxSteps"] == {
        "description": "Optimizer steps to train. Default: 1000.", "type": "integer", "minimum": 0,
        "exclusiveMinimum": True}
    assert spec_props["model"]["properties"]["config"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec_props["training"]["properties"]["optimizer"]["properties"]["betas"]["items"] == {"type": "number"}
    assert spec_props["workers"]["x-kubernetes-validations"]
    assert "additionalProperties" not in json.dumps(spec_props["training"])  # structural: no false/true flags


def _api_server_validator() -> Any:
    """The CRD's openAPIV3Schema as a JSON Schema validator. OpenAPI 3.0 schemas are JSON Schema draft 4
    (boolean exclusiveMinimum) plus x-kubernetes-* extensions, which draft 4 ignores; `kubectl apply`
    (strict field validation since 1.27) also rejects unknown fields, which additionalProperties: false
    on every object without x-kubernetes-preserve-unknown-fields expresses. CEL rules are not evaluated here
    (the operator checks the same constraints itself: test_operator_plan's InvalidSpec tests)."""
    import jsonschema

    def strict(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if node.get("type") == "object" and "properties" in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        elif isinstance(node, list):
            node = [strict(v) for v in node]
        return node

    schema = strict(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server validates metadata itself
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "manifests/examples").glob("*.yaml")))
def test_examples_pass_the_crd_schema(example: str) -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/examples" / example).read_text())
            if d and d.get("kind") == "LLMTrainingJob"]
    assert docs
    for doc in docs:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in
                  _api_server_validator().iter_errors(doc)]
        assert errors == []


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("spec", "training", "maxSteps"), "ten", "is not of type 'integer'"),
    (("spec", "training", "maxSteps"), 0, "less than or equal to the minimum"),
    (("spec", "workers", "nodes"), 1.5, "is not of type 'integer'"),
    (("spec", "training", "optimizer", "lr"), "fast", "is not of type 'number'"),
    (("spec", "runPolicy", "cleanPodPolicy"), "Sometimes", "is not one of"),
    (("spec", "training", "maxStep"), 10, "Additional properties are not allowed"),
])
def test_the_crd_schema_rejects_wrong_types_at_apply(path: tuple[str, ...], value: Any, complaint: str) -> None:
    doc = yaml.safe_load((ROOT / "manifests/examples/tiny-cpu.yaml").read_text())
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    errors = [(".".join(map(str, e.absolute_path)), e.message) for e in _api_server_validator().iter_errors(doc)]
    where = ".".join(path) if "Additional" not in complaint else ".".join(path[:-1])
    assert any(at == where and complaint in message for at, message in errors), errors


@pytest.mark.parametrize("path", ["manifests/crd.yaml", "charts/kubetrain/crds/llmtrainingjobs.yaml"])
def test_crd_files_are_generated_from_the_models(path: str) -> None:
    """Regenerate with: kubetrain crd --write manifests/crd.yaml --write charts/kubetrain/crds/llmtrainingjobs.yaml"""
    assert (ROOT / path).read_text() == crd_yaml(), f"{path} is stale: regenerate it with `kubetrain crd --write`"
    assert yaml.safe_load((ROOT / path).read_text())["kind"] == "CustomResourceDefinition"


# --- CLI and packaging ---------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetrain_cli", *args], capture_output=True, text=True, timeout=120)


def test_kubetrain_render_prints_what_the_operator_creates(tmp_path: Path) -> None:
    result = _cli("render", str(ROOT / "manifests/examples/llama-7b.yaml"), "--namespace", "ml")
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["Service", "ConfigMap", "Pod", "Pod", "Pod", "Pod"]
    assert "the batch does not split" not in result.stderr  # the example keeps training on minNodes
    manifest = yaml.safe_load((ROOT / "manifests/examples/llama-7b.yaml").read_text())
    manifest["spec"]["training"]["globalBatchSize"] = 1024  # 1024 / 24 processes does not divide
    uneven = tmp_path / "uneven.yaml"
    uneven.write_text(yaml.safe_dump(manifest))
    result = _cli("render", str(uneven))
    assert result.returncode == 0 and "with 3 nodes (24 processes) the batch does not split" in result.stderr
    bad = tmp_path / "bad.yaml"
    manifest = yaml.safe_load((ROOT / "manifests/examples/llama-7b.yaml").read_text())
    manifest["spec"]["workers"]["podTemplate"]["hostPID"] = True
    bad.write_text(yaml.safe_dump(manifest))
    result = _cli("render", str(bad))
    assert result.returncode == 2 and "spec.workers.podTemplate.hostPID: not supported" in result.stderr


def test_kubetrain_crd_prints_the_crd() -> None:
    result = _cli("crd")
    assert result.returncode == 0 and result.stdout == crd_yaml()


def test_operator_settings_from_the_environment() -> None:
    config = OperatorConfig.from_env({"KUBETRAIN_OPERATOR_RESYNC_SECONDS": "5",
                                      "KUBETRAIN_OPERATOR_BELOW_MIN_GRACE_SECONDS": "60"})
    assert config.resync_seconds == 5.0 and config.planner.below_min_grace_seconds == 60.0


@pytest.mark.asyncio
async def test_metrics_endpoint_serves_the_operator_metrics() -> None:
    import aiohttp
    from kubetrain_operator.metrics import JobSummary, OperatorMetrics, bound_port, serve

    jobs = {("ml", "a"): JobSummary.of("Running", {"restarts": 2, "workers": {"desired": 4, "active": 3, "ready": 3}}),
            ("ml", "b"): JobSummary.of("Failed", {"reason": "InvalidSpec", "workers": "garbage"})}
    metrics = OperatorMetrics(lambda: jobs)
    metrics.restarts.labels(reason="OOMKilled").inc()
    runner = await serve(metrics.exposition, 0, host="127.0.0.1")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{bound_port(runner)}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"http://127.0.0.1:{bound_port(runner)}/healthz") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    assert 'kubetrain_operator_jobs{phase="Running"} 1.0' in text
    assert 'kubetrain_operator_jobs{phase="Pending"} 0.0' in text
    assert 'kubetrain_operator_job_phase{job_name="b",namespace="ml",phase="Failed",reason="InvalidSpec"} 1.0' in text
    assert 'kubetrain_operator_job_restarts{job_name="a",namespace="ml"} 2.0' in text
    assert 'kubetrain_operator_job_workers{job_name="a",namespace="ml",state="active"} 3.0' in text
    assert 'kubetrain_operator_job_workers{job_name="b",namespace="ml",state="desired"} 0.0' in text
    assert 'kubetrain_operator_restarts_total{reason="OOMKilled"} 1.0' in text
    assert "kubetrain_operator_reconcile_duration_seconds_bucket" in text
