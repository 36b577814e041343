"""Spec → Kubernetes objects: the headless Service, the trainer-config ConfigMap and the worker Pods.

Pure functions; the operator and `kubetrain render` both call `render_objects`/`render_pod`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kubetrain_api.contract import HEALTH_PATH, entrypoint_argv, trainer_argv
from kubetrain_api.exit_codes import EXIT_CONFIG
from kubetrain_api.manifest import API_VERSION, KIND, JobSpec
from kubetrain_api.preparation import Step, stage_argv

from . import preparation
from .pod_template import POD_TEMPLATE_POD

DEFAULT_IMAGE = "ghcr.io/kubetrain/trainer:0.1.0"
RDZV_PORT = 29400
CONFIG_DIR = "/etc/kubetrain"
CONFIG_FILE = "config.json"
OUTPUT_DIR = "/var/run/kubetrain/output"
CONTAINER = "trainer"
OUR_VOLUMES = ("kubetrain-config", "kubetrain-output", "kubetrain-shm")
# SIGTERM → the trainer finishes its step and commits a checkpoint; torchrun waits this long for it.
DEFAULT_GRACE_SECONDS = 900
GRACE_MARGIN_SECONDS = 30

LABEL_JOB = "kubetrain.io/job-name"
LABEL_INDEX = "kubetrain.io/replica-index"
LABEL_ROLE = "kubetrain.io/role"
ANNOTATION_CONFIG_HASH = "kubetrain.io/config-hash"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
MANAGED_BY = {"app.kubernetes.io/name": "kubetrain", "app.kubernetes.io/managed-by": "kubetrain-operator"}


@dataclass(frozen=True)
class JobRef:
    """The identity of an LLMTrainingJob: enough to name and own its objects."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str] = field(default_factory=dict, compare=False)


def service_name(job: JobRef) -> str:
    return job.name


def config_name(job: JobRef) -> str:
    return f"{job.name}-config"


def pod_name(job: JobRef, index: int) -> str:
    return f"{job.name}-worker-{index}"


def selector(job: JobRef) -> str:
    return f"{LABEL_JOB}={job.name}"


def rdzv_endpoint(job: JobRef) -> str:
    return f"{pod_name(job, 0)}.{service_name(job)}.{job.namespace}.svc:{RDZV_PORT}"


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(job: JobRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace,
            "labels": {**MANAGED_BY, LABEL_JOB: job.name, **(labels or {})},
            "ownerReferences": [owner_reference(job)]}


def trainer_config_json(spec: JobSpec) -> str:
    """What the workers train with: the spec's trainer sections, with the preparation stage's output in place
    of raw text and a tokenizer to train (preparation.worker_config)."""
    return json.dumps(preparation.worker_config(spec, OUTPUT_DIR).to_wire(), indent=2, sort_keys=True) + "\n"


def stage_config_json(spec: JobSpec) -> str:
    """What the preparation stage reads: the spec's trainer sections as written."""
    return json.dumps(spec.trainer_config().to_wire(), indent=2, sort_keys=True) + "\n"


def config_hash(spec: JobSpec) -> str:
    return hashlib.sha256(trainer_config_json(spec).encode()).hexdigest()[:16]


def render_service(job: JobRef, spec: JobSpec) -> dict[str, Any]:
    ports = [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]
    if spec.metrics.port:
        ports.append({"name": "metrics", "port": spec.metrics.port, "targetPort": spec.metrics.port})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(job, service_name(job)),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL_JOB: job.name},
                 "ports": ports},
    }


def render_configmap(job: JobRef, spec: JobSpec) -> dict[str, Any]:
    meta = _metadata(job, config_name(job))
    meta["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(spec)}
    data = {CONFIG_FILE: trainer_config_json(spec)}
    if preparation.mode(spec) != "none":
        data[preparation.STAGE_CONFIG_FILE] = stage_config_json(spec)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def grace_seconds(spec: JobSpec) -> int:
    value = spec.workers.pod_template.get("terminationGracePeriodSeconds")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_GRACE_SECONDS


def torchrun_args(job: JobRef, spec: JobSpec) -> list[str]:
    """One torchrun round per pod, of exactly the job's current size: `--max-restarts=0`, because the
    operator, not torchrun, restarts a failed group and re-forms it at a new size (policies/restart.py,
    policies/workers.py). torchrun's second round in the same agent was unreliable (gloo dialled ports of the
    previous round, or hung in init_process_group: issue 12), and a restart torchrun makes is one the
    operator can neither count nor stop after a configuration error."""
    nodes = spec.workers.nodes
    return [
        "torchrun", f"--nnodes={nodes}:{nodes}", f"--nproc-per-node={spec.workers.proc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint(job)}", f"--rdzv-id={job.uid}",
        "--max-restarts=0",
        *trainer_argv(f"{CONFIG_DIR}/{CONFIG_FILE}", OUTPUT_DIR),
    ]


def container_command(job: JobRef, spec: JobSpec) -> list[str]:
    """torchrun under a small wrapper that forwards SIGTERM and reports the trainer's own exit code
    (torchrun itself exits 1 whatever its workers returned); see kubetrain_api.contract.pod_outcome."""
    return entrypoint_argv(OUTPUT_DIR, torchrun_args(job, spec))


def _s3_secret(spec: JobSpec) -> str | None:
    s3 = getattr(spec, "s3", None)
    secret = getattr(s3, "credentials_secret", None)
    return secret if isinstance(secret, str) and secret else None


def _merge_env(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {e.get("name") for e in theirs}
    return [e for e in ours if e["name"] not in names] + copy.deepcopy(theirs)


def render_pod(job: JobRef, spec: JobSpec, index: int) -> dict[str, Any]:
    """Worker `index`: its stable name and DNS (hostname + subdomain), the trainer container, our volumes and
    then spec.workers.podTemplate's pod-level fields."""
    template = spec.workers.pod_template
    volumes: list[dict[str, Any]] = [
        {"name": "kubetrain-config", "configMap": {"name": config_name(job)}},
        {"name": "kubetrain-output", "emptyDir": {}},
    ]
    if not _user_mounts_shm(spec):
        volumes.append({"name": "kubetrain-shm", "emptyDir": {"medium": "Memory"}})
    pod_spec: dict[str, Any] = {
        "hostname": pod_name(job, index),
        "subdomain": service_name(job),
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace_seconds(spec),
        "containers": [_trainer_container(job, spec, index)],
        "volumes": volumes + copy.deepcopy(template.get("volumes", [])),
    }
    for key in POD_TEMPLATE_POD:
        if key in template and key not in ("volumes", "terminationGracePeriodSeconds"):
            pod_spec[key] = copy.deepcopy(template[key])
    _no_token_unless_asked(pod_spec, template)
    if preparation.mode(spec) == "init":  # ours first: the template's init containers may read the data
        pod_spec["initContainers"] = [_prepare_init_container(spec), *pod_spec.get("initContainers", [])]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _pod_metadata(job, spec, index), "spec": pod_spec}


def _no_token_unless_asked(pod_spec: dict[str, Any], template: dict[str, Any]) -> None:
    """The trainer never calls the API server: the namespace's default ServiceAccount token stays out of the
    pod unless the template names a ServiceAccount (e.g. one bound to a cloud IAM role)."""
    if "serviceAccountName" not in template:
        pod_spec["automountServiceAccountToken"] = False


def _pod_metadata(job: JobRef, spec: JobSpec, index: int) -> dict[str, Any]:
    """Owned by the job; our labels win over the template's. Kueue admits the workers as one pod group."""
    template = spec.workers.pod_template
    labels = {LABEL_INDEX: str(index), LABEL_ROLE: "worker"}
    annotations = {ANNOTATION_CONFIG_HASH: config_hash(spec)}
    if KUEUE_QUEUE in job.labels:
        labels.update({KUEUE_QUEUE: job.labels[KUEUE_QUEUE], KUEUE_GROUP: job.name})
        annotations[KUEUE_GROUP_COUNT] = str(spec.workers.nodes)
    meta = _metadata(job, pod_name(job, index), labels)
    meta["labels"] = {**template.get("labels", {}), **meta["labels"]}
    meta["annotations"] = {**template.get("annotations", {}), **annotations}
    return meta


def _user_mounts_shm(spec: JobSpec) -> bool:
    return any(m.get("mountPath") == "/dev/shm" for m in spec.workers.pod_template.get("volumeMounts", []))


def _trainer_container(job: JobRef, spec: JobSpec, index: int) -> dict[str, Any]:
    """torchrun under the entrypoint; the template's env wins over ours, its mounts and envFrom are added."""
    template = spec.workers.pod_template
    env: list[dict[str, Any]] = [
        {"name": "KUBETRAIN_JOB_NAME", "value": job.name},
        {"name": "KUBETRAIN_REPLICA_INDEX", "value": str(index)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(max(1, grace_seconds(spec) - GRACE_MARGIN_SECONDS))},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "kubetrain-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "kubetrain-output", "mountPath": OUTPUT_DIR},
    ]
    if not _user_mounts_shm(spec):  # NCCL and data loaders need shm
        mounts.append({"name": "kubetrain-shm", "mountPath": "/dev/shm"})
    ports = [{"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or DEFAULT_IMAGE,
        "command": container_command(job, spec),
        "env": _merge_env(env, template.get("env", [])),
        "volumeMounts": mounts + copy.deepcopy(template.get("volumeMounts", [])),
        "ports": ports,
        "resources": copy.deepcopy(spec.workers.resources),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    secret = _s3_secret(spec)
    env_from: list[dict[str, Any]] = [{"secretRef": {"name": secret}}] if secret else []
    if env_from or template.get("envFrom"):
        container["envFrom"] = env_from + copy.deepcopy(template.get("envFrom", []))
    if spec.metrics.port:
        ports.append({"name": "metrics", "containerPort": spec.metrics.port, "protocol": "TCP"})
        container["readinessProbe"] = {"httpGet": {"path": HEALTH_PATH, "port": spec.metrics.port},
                                       "periodSeconds": 10, "failureThreshold": 3}
    if "imagePullPolicy" in template:
        container["imagePullPolicy"] = template["imagePullPolicy"]
    if "containerSecurityContext" in template:
        container["securityContext"] = copy.deepcopy(template["containerSecurityContext"])
    return container


def _stage_container(spec: JobSpec, step: Step, location: str) -> dict[str, Any]:
    """The preparation stage (kubetrain_trainer.prepare_stage) in the trainer image: the worker container's
    environment, S3 secret, podTemplate env and mounts; resources as the workers' but CPU and memory only
    (tokenising needs no accelerator)."""
    template = spec.workers.pod_template
    env = [{"name": "KUBETRAIN_PREPARE_STEP", "value": step}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    mounts: list[dict[str, Any]] = [
        {"name": "kubetrain-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "kubetrain-output", "mountPath": OUTPUT_DIR},
    ]
    resources = {kind: {k: v for k, v in copy.deepcopy(values).items() if k in ("cpu", "memory")}
                 for kind, values in spec.workers.resources.items() if isinstance(values, dict)}
    container: dict[str, Any] = {
        "name": preparation.CONTAINER,
        "image": spec.image or DEFAULT_IMAGE,
        "command": stage_argv(f"{CONFIG_DIR}/{preparation.STAGE_CONFIG_FILE}", location, step,
                              spec.preparation.parts, workdir=f"{OUTPUT_DIR}/stage"),
        "env": _merge_env(env, template.get("env", [])),
        "volumeMounts": mounts + copy.deepcopy(template.get("volumeMounts", [])),
        "resources": {k: v for k, v in resources.items() if v},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    secret = _s3_secret(spec)
    env_from: list[dict[str, Any]] = [{"secretRef": {"name": secret}}] if secret else []
    if env_from or template.get("envFrom"):
        container["envFrom"] = env_from + copy.deepcopy(template.get("envFrom", []))
    if "imagePullPolicy" in template:
        container["imagePullPolicy"] = template["imagePullPolicy"]
    if "containerSecurityContext" in template:
        container["securityContext"] = copy.deepcopy(template["containerSecurityContext"])
    return container


def _prepare_init_container(spec: JobSpec) -> dict[str, Any]:
    """Mode `init`: the worker prepares into its own output volume, where its config.json points."""
    loc = preparation.location(spec, OUTPUT_DIR)
    assert loc is not None
    return _stage_container(spec, "all", loc)


def render_stage_job(job: JobRef, spec: JobSpec, step: Step) -> dict[str, Any]:
    """One step of the preparation stage (mode `job`) as a batch/v1 Job owned by the LLMTrainingJob: Indexed,
    one completion per part; exit 2 (a wrong input) fails it at once, other failures are retried."""
    loc = preparation.location(spec, OUTPUT_DIR)
    assert loc is not None
    template = spec.workers.pod_template
    labels = {LABEL_ROLE: preparation.ROLE, preparation.LABEL_STEP: step}
    n = preparation.completions(spec, step)
    pod_meta = {"labels": {**template.get("labels", {}), **MANAGED_BY, LABEL_JOB: job.name, **labels}}
    if template.get("annotations"):
        pod_meta["annotations"] = copy.deepcopy(template["annotations"])
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [_stage_container(spec, step, loc)],
        "volumes": [{"name": "kubetrain-config", "configMap": {"name": config_name(job)}},
                    {"name": "kubetrain-output", "emptyDir": {}}, *copy.deepcopy(template.get("volumes", []))],
    }
    for key in POD_TEMPLATE_POD:
        if key in template and key != "volumes":
            pod_spec[key] = copy.deepcopy(template[key])
    _no_token_unless_asked(pod_spec, template)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(job, preparation.job_name(job.name, step), labels),
        "spec": {
            "completionMode": "Indexed", "completions": n, "parallelism": n,
            "backoffLimit": preparation.BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": preparation.CONTAINER, "operator": "In", "values": [EXIT_CONFIG]}}]},
            "template": {"metadata": pod_meta, "spec": pod_spec},
        },
    }


def render_stage_jobs(job: JobRef, spec: JobSpec) -> list[dict[str, Any]]:
    """The stage's Jobs in the order the operator creates them (each once the previous has completed)."""
    if preparation.mode(spec) != "job":
        return []
    return [render_stage_job(job, spec, step) for step in preparation.steps(spec)]


def render_objects(job: JobRef, spec: JobSpec) -> list[dict[str, Any]]:
    """Everything the operator creates for a job at its desired size, in creation order (the preparation
    Jobs, when there are any, one after another and before the workers)."""
    return [render_service(job, spec), render_configmap(job, spec), *render_stage_jobs(job, spec),
            *(render_pod(job, spec, i) for i in range(spec.workers.nodes))]
