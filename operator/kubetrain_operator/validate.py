"""Semantic validation of an LLMTrainingJob spec as the operator sees it (any input, never raises)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetrain_api.config import format_validation_error
from kubetrain_api.manifest import JobSpec
from pydantic import ValidationError

from . import preparation

# podTemplate keys and where they go: the pod's metadata, the pod's spec, or the trainer container.
POD_TEMPLATE_META = ("labels", "annotations")
POD_TEMPLATE_POD = (
    "nodeSelector", "tolerations", "affinity", "volumes", "securityContext", "serviceAccountName",
    "priorityClassName", "schedulerName", "imagePullSecrets", "terminationGracePeriodSeconds",
    "runtimeClassName", "topologySpreadConstraints", "initContainers", "dnsPolicy", "dnsConfig",
    "hostNetwork", "hostIPC", "shareProcessNamespace",
)
POD_TEMPLATE_CONTAINER = ("env", "envFrom", "volumeMounts", "imagePullPolicy", "containerSecurityContext")
POD_TEMPLATE_KEYS = POD_TEMPLATE_META + POD_TEMPLATE_POD + POD_TEMPLATE_CONTAINER
_LISTS = ("tolerations", "volumes", "imagePullSecrets", "topologySpreadConstraints", "initContainers", "env",
          "envFrom", "volumeMounts")
_MAPS = ("labels", "annotations", "nodeSelector", "affinity", "securityContext", "containerSecurityContext",
         "dnsConfig")

MAX_NAME = 63  # pod hostnames and Service names are DNS labels


@dataclass(frozen=True)
class Validated:
    """`spec` is None when the spec cannot be read; with `size_only`, it is fine but for workers.nodes
    (the batch does not split over that many processes): a running job keeps its size instead of failing."""

    spec: JobSpec | None
    error: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    size_only: bool = False


def max_job_name_length(max_nodes: int) -> int:
    return MAX_NAME - len("-worker-") - len(str(max(0, max_nodes - 1)))


def validate_job(name: str, raw_spec: Any) -> Validated:
    """The parsed spec, or the reason it cannot run (naming the field); warnings about risky settings."""
    if not isinstance(raw_spec, dict):
        return Validated(None, "spec: must be a mapping with at least spec.data")
    try:
        spec = JobSpec.model_validate(raw_spec)
    except ValidationError as exc:
        return Validated(None, format_validation_error(exc, prefix="spec"))
    except Exception as exc:  # a validator tripping over odd input must not take the operator down
        return Validated(None, f"spec: cannot be read ({type(exc).__name__}: {exc})")
    errors = []
    low, high = spec.workers.elastic_range
    if not name[:1].isalpha():
        errors.append(f"metadata.name ({name!r}) must start with a letter: it names the job's Service")
    elif len(name) > max_job_name_length(high):
        errors.append(f"metadata.name ({name!r}) is too long for worker hostnames ({name}-worker-{high - 1}); "
                      f"use at most {max_job_name_length(high)} characters")
    errors.extend(_pod_template_errors(spec.workers.pod_template))
    errors.extend(_preparation_errors(name, spec))
    if errors:
        return Validated(None, "\n".join(errors))
    world = spec.workers.nodes * spec.workers.proc_per_node
    layout = spec.training.batch_layout_error(world)
    if layout:
        return Validated(spec, f"spec.{layout} (workers.nodes {spec.workers.nodes} × procPerNode "
                               f"{spec.workers.proc_per_node})", size_only=True)
    warnings = []
    for nodes in range(low, high + 1):
        if nodes != spec.workers.nodes and spec.training.batch_layout_error(nodes * spec.workers.proc_per_node):
            warnings.append(
                f"with {nodes} nodes ({nodes * spec.workers.proc_per_node} processes) the batch does not split: "
                f"{spec.training.batch_layout_error(nodes * spec.workers.proc_per_node)}; the trainer stops with "
                f"a configuration error if the job runs at that size")
    if spec.checkpoint.uri is None:
        warnings.append("checkpoint.uri is not set: checkpoints stay in each pod's emptyDir and are lost when a "
                        "worker is replaced; set it to a shared volume path or an s3:// URI to resume after restarts")
    if preparation.mode(spec) == "init":
        warnings.append("the data are raw text or the tokenizer is trained, and there is no shared storage: the "
                        "worker prepares them in its own volume, again after every restart; set checkpoint.uri (or "
                        "preparation.uri) to an s3:// prefix or a shared volume to prepare them once")
    return Validated(spec, None, tuple(warnings))


def _preparation_errors(name: str, spec: JobSpec) -> list[str]:
    """A job whose data must be prepared first (preparation.py): where the output goes, and the Jobs' names."""
    m = preparation.mode(spec)
    if m == "init" and not preparation.init_possible(spec):
        high = spec.workers.elastic_range[1]
        what = ("spec.tokenizer.train learns a tokenizer" if spec.tokenizer.train is not None
                else f"spec.data.train ({spec.data.train!r}) is raw text")
        return [f"spec.checkpoint.uri: {what}, which is prepared once before the workers start, and up to {high} "
                f"workers must read one prepared copy: set spec.checkpoint.uri (or spec.preparation.uri) to an "
                f"s3:// prefix or a path on a volume every worker mounts, or prepare the data beforehand "
                f"(`kubetrain prepare --output s3://...`) and point spec.data.train at the shards"]
    if m == "job" and len(name) + preparation.MAX_SUFFIX > MAX_NAME:
        return [f"metadata.name ({name!r}) is too long for the data preparation Jobs ({name}-tokenizer); use at "
                f"most {MAX_NAME - preparation.MAX_SUFFIX} characters"]
    if m == "init" and spec.preparation.parts > 1:
        return [f"spec.preparation.parts ({spec.preparation.parts}) fans out over pods that write to shared "
                f"storage: set spec.checkpoint.uri or spec.preparation.uri, or use parts: 1"]
    return []


def _pod_template_errors(template: dict[str, Any]) -> list[str]:
    errors = []
    for key, value in template.items():
        where = f"spec.workers.podTemplate.{key}"
        if key not in POD_TEMPLATE_KEYS:
            errors.append(f"{where}: not supported; use one of {', '.join(sorted(POD_TEMPLATE_KEYS))}")
        elif key in _LISTS and not isinstance(value, list):
            errors.append(f"{where}: must be a list")
        elif key in _MAPS and not isinstance(value, dict):
            errors.append(f"{where}: must be a mapping")
        elif key in _LISTS and not all(isinstance(item, dict) for item in value):
            errors.append(f"{where}: every item must be a mapping")
        elif key in ("labels", "annotations", "nodeSelector") and not all(
                isinstance(v, str) for v in value.values()):
            errors.append(f"{where}: values must be strings")
    return errors
