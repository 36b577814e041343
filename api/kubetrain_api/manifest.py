"""The LLMTrainingJob manifest (kubetrain.io/v1alpha1): the trainer config plus cluster sections.

pydantic only (no torch, no Kopf): `kubetrain run` reads manifests with it, and the operator's CRD
schema is generated from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .config import Section, TrainerConfig, format_validation_error

GROUP = "kubetrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMTrainingJob"
PLURAL = "llmtrainingjobs"
SHORT_NAMES = ["ltj", "llmjob"]


# Bounds on what one job may ask for, in the CRD schema and in validation alike: the shared operator works in
# proportion to them (a job is one of many it serves), and a Kubernetes cluster runs at most a few thousand nodes.
MAX_NODES = 10_000
MAX_SECONDS = 10 * 365 * 24 * 3600
MAX_URI = 1024


class ManifestError(Exception):
    """An invalid manifest; the message names each bad field and the fix."""


class WorkersSpec(Section):
    nodes: int = Field(1, ge=1, le=MAX_NODES, description="Worker pods (one torchrun agent each) to start.")
    min_nodes: int | None = Field(
        None, ge=1, le=MAX_NODES, description="Fewest nodes to train with (elastic); default: nodes.")
    max_nodes: int | None = Field(None, ge=1, le=MAX_NODES,
                                  description="Most nodes the job may scale to. Default: nodes.")
    proc_per_node: int = Field(1, ge=1, le=64, description="Training processes per node (usually GPUs per node).")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Container resources (requests/limits), e.g. nvidia.com/gpu: 8.")
    pod_template: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged into each worker pod: nodeSelector, tolerations, affinity, volumes, env, securityContext.")

    @model_validator(mode="after")
    def _elastic_range(self) -> WorkersSpec:
        low = self.min_nodes if self.min_nodes is not None else self.nodes
        high = self.max_nodes if self.max_nodes is not None else self.nodes
        if low > high:
            raise ValueError(f"workers.minNodes ({low}) must not exceed workers.maxNodes ({high}); "
                             f"lower minNodes or raise maxNodes")
        if not low <= self.nodes <= high:
            raise ValueError(f"workers.nodes ({self.nodes}) must lie within workers.minNodes..maxNodes "
                             f"({low}..{high})")
        return self

    @property
    def elastic_range(self) -> tuple[int, int]:
        return (self.min_nodes or self.nodes, self.max_nodes or self.nodes)


class RunPolicy(Section):
    max_restarts: int = Field(5, ge=0, le=10_000, description="Worker restarts allowed before the job fails.")
    restart_backoff_seconds: int = Field(
        10, ge=0, le=3600, description="First restart delay; doubles per restart (max 10 min).")
    active_deadline_seconds: int | None = Field(None, gt=0, le=MAX_SECONDS,
                                                description="Fail the job after this long running.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=MAX_SECONDS,
                                                   description="Delete the job this long after it ends.")
    suspend: bool = Field(False, description="Delete the pods (after a checkpoint) and hold the job; false resumes.")
    clean_pod_policy: Literal["Running", "All", "None"] = Field(
        "Running", description="Pods deleted when the job ends.")
    stall_timeout_seconds: int | None = Field(1800, gt=0, le=MAX_SECONDS,
                                              description="Restart workers when the step stalls this long.")


class PreparationSpec(Section):
    """Where and how a cluster job's raw text is prepared before its workers start (kubetrain_api.preparation);
    `kubetrain run` prepares under its output and ignores this section."""

    uri: str | None = Field(
        None, max_length=MAX_URI, description="Where the prepared data and tokenizer go: an s3:// prefix, or a "
        "path on a volume every pod mounts (workers.podTemplate). Default: <checkpoint.uri>/prepared/.")
    parts: int = Field(1, ge=1, le=1000, description="Pods the tokenisation fans out over (an Indexed Job; each "
                       "takes every N-th input file); the tokenizer is trained once before, one index merged after.")

    @model_validator(mode="after")
    def _known_scheme(self) -> PreparationSpec:
        if self.uri is not None and "://" in self.uri and not self.uri.startswith(("file://", "s3://")):
            raise ValueError(f"preparation.uri scheme {self.uri.split('://', 1)[0]}:// is not supported; use "
                             f"s3://bucket/prefix/ or a path on a shared volume")
        return self


class JobSpec(TrainerConfig):
    image: str | None = Field(None, max_length=512, description="Trainer image (clusters only).")
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    preparation: PreparationSpec = Field(default_factory=PreparationSpec)

    def trainer_config(self) -> TrainerConfig:
        """The trainer's own sections (what each pod's trainer is given)."""
        return TrainerConfig.model_validate(self.model_dump(include=set(TrainerConfig.model_fields)))


class Metadata(Section):
    model_config = Section.model_config | {"extra": "allow"}
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None


class LLMTrainingJob(Section):
    api_version: Literal["kubetrain.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LLMTrainingJob"]
    metadata: Metadata
    spec: JobSpec
    status: dict[str, Any] | None = None


def parse_manifest(doc: Any, source: str = "manifest") -> LLMTrainingJob:
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: expected a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        return LLMTrainingJob.model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(f"{source}: invalid LLMTrainingJob\n{format_validation_error(exc)}") from exc


def load_manifest(path: str | Path) -> LLMTrainingJob:
    """Read one LLMTrainingJob from a YAML file (the first document of that kind, if there are several)."""
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read the manifest ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{p}: not valid YAML ({exc})") from exc
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        raise ManifestError(f"{p}: no document with kind: {KIND}")
    return parse_manifest(jobs[0], str(p))
