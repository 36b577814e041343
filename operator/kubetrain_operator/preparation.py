"""Data preparation on the cluster, the operator's side (pure): whether a job needs it, how it runs, where its
output goes, what the workers are given, and what is observed of the stage's Jobs and pods.

- No preparation: data.train names prepared shards (a directory or prefix) and the tokenizer is given.
- `job`: batch/v1 Jobs, owned by the LLMTrainingJob, write to shared storage (spec.preparation.uri, else
  `<checkpoint.uri>/prepared/`) before any worker starts: `<job>-prepare` (one pod, `--step all`), or with
  spec.preparation.parts N > 1 `<job>-tokenizer`, then `<job>-prepare` (Indexed, N pods) and `<job>-merge`.
- `init`: one worker (nodes = maxNodes = 1) and no shared storage: the worker pod prepares into its own output
  volume in an init container (`--step all`) before torchrun, as `kubetrain run` prepares under its output.
- A multi-node job that needs preparation without shared storage cannot run: validate.py says so.

The stage's output location is `<base>/<settings fingerprint>/` (kubetrain_api.preparation), and its marker
makes a rerun (a new Job after a restart, or the same job applied again) exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kubetrain_api.config import TrainerConfig
from kubetrain_api.manifest import JobSpec
from kubetrain_api.preparation import Step, needs_preparation, prepared_config, prepared_location

from .coerce import as_dict, as_int, as_list, as_str

if TYPE_CHECKING:  # (ownership → render → this module)
    from .ownership import Owner

Mode = Literal["none", "job", "init"]
ROLE = "prepare"  # the stage pods' kubetrain.io/role (workers: "worker")
LABEL_STEP = "kubetrain.io/prepare-step"
CONTAINER = "prepare"
STAGE_CONFIG_FILE = "stage.json"  # the raw trainer config, beside config.json in the job's ConfigMap
JOB_SUFFIXES: dict[str, str] = {"all": "-prepare", "tokenizer": "-tokenizer", "part": "-prepare", "merge": "-merge"}
MAX_SUFFIX = max(len(s) for s in JOB_SUFFIXES.values())
BACKOFF_LIMIT = 3  # retries of a stage pod that failed for a reason other than its input (exit 2)


def shared_base(spec: JobSpec) -> str | None:
    """Where prepared data go on shared storage: spec.preparation.uri, else under checkpoint.uri, else None."""
    if spec.preparation.uri:
        return spec.preparation.uri.removeprefix("file://")
    uri = spec.checkpoint.uri
    if uri is None:
        return None
    return uri.removeprefix("file://").rstrip("/") + "/prepared/"


def mode(spec: JobSpec) -> Mode:
    if not needs_preparation(spec.trainer_config()):
        return "none"
    return "job" if shared_base(spec) is not None else "init"


def init_possible(spec: JobSpec) -> bool:
    return spec.workers.elastic_range[1] == 1


def location(spec: JobSpec, output_dir: str) -> str | None:
    """The stage's output location (None without preparation); `output_dir`: the worker's output volume."""
    m = mode(spec)
    if m == "none":
        return None
    base = shared_base(spec) if m == "job" else f"{output_dir}/prepared/"
    assert base is not None
    return prepared_location(base, spec.trainer_config())


def worker_config(spec: JobSpec, output_dir: str) -> TrainerConfig:
    """The trainer config the workers get: the prepared shards and tokenizer when there is a stage."""
    cfg = spec.trainer_config()
    loc = location(spec, output_dir)
    return cfg if loc is None else prepared_config(cfg, loc)


def steps(spec: JobSpec) -> list[Step]:
    """The stage's Jobs in order (mode `job`)."""
    return ["all"] if spec.preparation.parts == 1 else ["tokenizer", "part", "merge"]


def job_name(job_name: str, step: str) -> str:
    return job_name + JOB_SUFFIXES[step]


def completions(spec: JobSpec, step: str) -> int:
    return spec.preparation.parts if step == "part" else 1


# --- observation --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageJob:
    """What the planner needs of a stage Job."""

    name: str
    uid: str
    step: str
    complete: bool = False
    failed: bool = False
    message: str | None = None  # the Failed condition's
    succeeded: int = 0
    active: int = 0
    terminating: bool = False
    owner: Owner | None = None  # its controller ownerReference (ownership.py): an earlier job's may be there
    managed: bool = False  # it carries our labels


@dataclass(frozen=True)
class StagePod:
    """A stage pod (of a Job), or a worker's preparation init container (`init`), as far as it has got."""

    name: str
    step: str
    phase: str = "Pending"  # the pod's, or for an init container: Running | Succeeded | Failed
    exit_code: int | None = None
    message: str | None = None  # the termination message (the stage's last log lines on failure)
    init: bool = False
    created: str = ""  # creationTimestamp: the newest failure is the one reported
    # Whose it is (controller.Reconciler.stage keeps only the job's): a stage pod's controller is its batch Job, a
    # worker's (init) the LLMTrainingJob.
    owner: Owner | None = None
    managed: bool = False


@dataclass(frozen=True)
class StageView:
    """The data preparation as observed for one job: its Jobs and pods (handlers.py's indexes)."""

    jobs: list[StageJob] = field(default_factory=list)
    pods: list[StagePod] = field(default_factory=list)


def observe_stage_job(body: object) -> StageJob | None:
    from .ownership import controller_of, managed_by_us  # (ownership → render → this module)
    from .render import LABEL_JOB

    b = as_dict(body)
    meta, status = as_dict(b.get("metadata")), as_dict(b.get("status"))
    labels = as_dict(meta.get("labels"))
    name, step = as_str(meta.get("name")), as_str(labels.get(LABEL_STEP))
    if name is None or step not in JOB_SUFFIXES:
        return None
    complete = failed = False
    message = None
    for cond in as_list(status.get("conditions")):
        c = as_dict(cond)
        if c.get("status") != "True":
            continue
        if c.get("type") == "Complete":
            complete = True
        elif c.get("type") == "Failed":
            failed, message = True, as_str(c.get("message")) or as_str(c.get("reason"))
    return StageJob(name=name, uid=as_str(meta.get("uid")) or name, step=step, complete=complete, failed=failed,
                    message=message, succeeded=as_int(status.get("succeeded")) or 0,
                    active=as_int(status.get("active")) or 0, terminating=meta.get("deletionTimestamp") is not None,
                    owner=controller_of(meta), managed=managed_by_us(meta, as_str(labels.get(LABEL_JOB)) or ""))


def observe_stage_pod(body: object) -> StagePod | None:
    """A stage Job's pod, or a worker pod's `prepare` init container; None for anything else."""
    from .ownership import controller_of, managed_by_us  # (ownership → render → this module)
    from .render import LABEL_JOB

    b = as_dict(body)
    meta, status = as_dict(b.get("metadata")), as_dict(b.get("status"))
    labels = as_dict(meta.get("labels"))
    name = as_str(meta.get("name"))
    if name is None:
        return None
    created = as_str(meta.get("creationTimestamp")) or ""
    if labels.get("kubetrain.io/role") == ROLE:
        state = _container_state(as_list(status.get("containerStatuses")))
        phase = as_str(status.get("phase")) or "Pending"
        return StagePod(name, as_str(labels.get(LABEL_STEP)) or "all", phase, *state, created=created,
                        owner=controller_of(meta), managed=managed_by_us(meta, as_str(labels.get(LABEL_JOB)) or ""))
    for cs in as_list(status.get("initContainerStatuses")):
        if as_dict(cs).get("name") == CONTAINER:
            code, message = _container_state([cs])
            st = as_dict(as_dict(cs).get("state"))
            phase = ("Succeeded" if code == 0 else "Failed") if code is not None else (
                "Running" if st.get("running") is not None else "Pending")
            return StagePod(name, "all", phase, code, message, init=True, created=created, owner=controller_of(meta),
                            managed=managed_by_us(meta, as_str(labels.get(LABEL_JOB)) or ""))
    return None


def _container_state(statuses: list[object]) -> tuple[int | None, str | None]:
    for cs in statuses:
        c = as_dict(cs)
        if c.get("name") != CONTAINER:
            continue
        term = as_dict(as_dict(c.get("state")).get("terminated")) or as_dict(
            as_dict(c.get("lastState")).get("terminated"))
        if term:
            return as_int(term.get("exitCode")), as_str(term.get("message"))
    return None, None
