"""Semantic validation of an LLMTrainingJob spec as the operator sees it (any input, never raises)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kubetrain_api.config import format_validation_error
from kubetrain_api.manifest import JobSpec
from pydantic import ValidationError

from . import preparation
from .pod_template import PodSecurity, security_errors, shape_errors
from .render import CONFIG_DIR, OUR_VOLUMES, OUTPUT_DIR, RDZV_PORT

MAX_NAME = 63  # pod hostnames and Service names are DNS labels
# The Service is named after the job: a DNS-1035 label (the API server allows dots in a custom object's name).
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_MESSAGE = 4000  # status.message: a few errors, not the whole spec echoed back
MAX_SIZE_RANGES = 8  # sizes the batch does not split over, summarised in one warning


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


def validate_job(name: str, raw_spec: Any, security: PodSecurity | None = None) -> Validated:
    """The parsed spec, or the reason it cannot run (naming the field); warnings about risky settings.
    `security`: what podTemplate may ask for (default: as the operator's environment sets it)."""
    if not isinstance(raw_spec, dict):
        return Validated(None, "spec: must be a mapping with at least spec.data")
    try:
        spec = JobSpec.model_validate(raw_spec)
    except ValidationError as exc:
        return Validated(None, _capped(format_validation_error(exc, prefix="spec")))
    except Exception as exc:  # a validator tripping over odd input must not take the operator down
        return Validated(None, _capped(f"spec: cannot be read ({type(exc).__name__}: {exc})"))
    errors = _name_errors(name, spec)
    template = spec.workers.pod_template
    errors.extend(shape_errors(template) or security_errors(template, security or PodSecurity.from_env()))
    errors.extend(_clash_errors(spec))
    errors.extend(_preparation_errors(name, spec))
    if errors:
        return Validated(None, _capped("\n".join(errors)))
    world = spec.workers.nodes * spec.workers.proc_per_node
    layout = spec.training.batch_layout_error(world)
    if layout:
        return Validated(spec, f"spec.{layout} (workers.nodes {spec.workers.nodes} × procPerNode "
                               f"{spec.workers.proc_per_node})", size_only=True)
    warnings = [w for w in [unsplittable_sizes_warning(spec)] if w]
    if spec.checkpoint.uri is None:
        warnings.append("checkpoint.uri is not set: checkpoints stay in each pod's emptyDir and are lost when a "
                        "worker is replaced; set it to a shared volume path or an s3:// URI to resume after restarts")
    if preparation.mode(spec) == "init":
        warnings.append("the data are raw text or the tokenizer is trained, and there is no shared storage: the "
                        "worker prepares them in its own volume, again after every restart; set checkpoint.uri (or "
                        "preparation.uri) to an s3:// prefix or a shared volume to prepare them once")
    return Validated(spec, None, tuple(warnings))


def _capped(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " … (truncated)"


def _name_errors(name: str, spec: JobSpec) -> list[str]:
    high = spec.workers.elastic_range[1]
    if not _DNS_1035.fullmatch(name):
        return [f"metadata.name ({name[:MAX_NAME + 10]!r}) must start with a letter and hold only lower-case "
                f"letters, digits and '-' (a DNS-1035 label, no dots): it names the job's Service and its "
                f"workers' hostnames; rename the job"]
    if len(name) > max_job_name_length(high):
        return [f"metadata.name ({name!r}) is too long for worker hostnames ({name}-worker-{high - 1}); "
                f"use at most {max_job_name_length(high)} characters"]
    secret = spec.s3.credentials_secret
    if secret is not None and not (len(secret) <= 253 and _DNS_1123_SUBDOMAIN.fullmatch(secret)):
        return [f"spec.s3.credentialsSecret ({secret[:80]!r}) is not a Secret name (lower-case letters, digits, "
                f"'-' and '.', at most 253 characters); use the name `kubectl get secret` shows"]
    return []


def _clash_errors(spec: JobSpec) -> list[str]:
    """What the pod the operator renders would hold twice (the API server refuses such a pod with a 422)."""
    errors = []
    if spec.metrics.port == RDZV_PORT:
        errors.append(f"spec.metrics.port ({RDZV_PORT}) is the workers' rendezvous port (torchrun's store on "
                      f"worker 0); use another port, e.g. 9400")
    template = spec.workers.pod_template
    names = [v.get("name") for v in template.get("volumes", []) if isinstance(v, dict)]
    for i, volume_name in enumerate(names):
        if volume_name in OUR_VOLUMES or volume_name in names[:i]:
            errors.append(f"spec.workers.podTemplate.volumes[{i}].name ({volume_name!r}) is used twice in the pod "
                          f"(the operator's own volumes are {', '.join(OUR_VOLUMES)}); rename the volume")
    for i, mount in enumerate(template.get("volumeMounts", [])):
        if isinstance(mount, dict) and str(mount.get("mountPath", "")).rstrip("/") in (CONFIG_DIR, OUTPUT_DIR):
            errors.append(f"spec.workers.podTemplate.volumeMounts[{i}].mountPath ({mount.get('mountPath')!r}) "
                          f"is where the operator mounts the trainer's config or output; mount it elsewhere")
    return errors


def unsplittable_sizes_warning(spec: JobSpec) -> str | None:
    """One warning for every size in minNodes..maxNodes but the current one that the batch does not split over:
    the sizes as ranges, the first MAX_SIZE_RANGES of them (the range is bounded by the schema's maximum)."""
    low, high = spec.workers.elastic_range
    procs, training = spec.workers.proc_per_node, spec.training
    unit = procs * training.micro_batch_size  # a size works when nodes × procPerNode × microBatchSize divides it
    bad = [n for n in range(low, high + 1) if n != spec.workers.nodes and training.global_batch_size % (n * unit)]
    if not bad:
        return None
    ranges: list[tuple[int, int]] = []
    for n in bad:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    shown = ranges[:MAX_SIZE_RANGES]
    left = len(bad) - sum(last - first + 1 for first, last in shown)
    more = f" and at {left} other sizes up to {bad[-1]}" if left else ""
    nodes = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in shown)
    processes = ", ".join(str(a * procs) if a == b else f"{a * procs}..{b * procs}" for a, b in shown)
    why = training.batch_layout_error(bad[0] * procs)
    likewise = f" (at {bad[0]} nodes; likewise at the others)" if len(bad) > 1 else ""
    return (f"with {nodes} nodes ({processes} processes){more} the batch does not split: {why}{likewise}; the "
            f"trainer stops with a configuration error if the job runs at that size")


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


