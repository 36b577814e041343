"""The LLMTrainingJob status: its schema (for the CRD and `kubectl explain`) and the vocabulary.

The operator reads and writes status as plain dicts (merge patches); these models document the shape
and let tests check that what the planner writes fits the schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .config import Section
from .contract import CHECKPOINT_CATALOGUE_MAX
from .manifest import MAX_URI

PENDING, PREPARING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Preparing", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
PHASES = (PENDING, PREPARING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED)
TERMINAL = (SUCCEEDED, FAILED)
# One condition per phase but Pending; `kubectl wait --for=condition=Succeeded ltj/x` works. Preparing: the
# data preparation stage runs before the workers (or in the worker's init container).
CONDITION_TYPES = (PREPARING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED)

Phase = Literal["Pending", "Preparing", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class Condition(Section):
    """A standard Kubernetes condition."""

    type: str = Field(description="Preparing, Running, Restarting, Suspended, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, description="Why the condition last changed, in CamelCase.")
    message: str | None = Field(None, description="What happened, for people.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")


class WorkersStatus(Section):
    desired: int = Field(0, description="Worker pods wanted (spec.workers.nodes).")
    active: int = Field(0, description="Worker pods pending or running and not terminating (the scale status).")
    ready: int = Field(0, description="Worker pods running and ready.")
    failed: int = Field(0, description="Worker pods failed or terminating, not yet replaced.")


class ProgressStatus(Section):
    step: int | None = Field(None, description="Optimizer steps completed (from worker 0's /progress).")
    max_steps: int | None = Field(None, description="Optimizer steps the job will run.")
    loss: float | None = Field(None, description="Training loss of the last step.")
    eval_loss: float | None = Field(None, description="Validation loss at the last evaluation.")
    eval_perplexity: float | None = Field(None, description="Validation perplexity at the last evaluation.")
    tokens_per_second: float | None = Field(None, description="Global training throughput.")
    mfu: float | None = Field(None, description="Model FLOPs utilisation (0-1).")
    eta_seconds: float | None = Field(None, description="Estimated seconds to the last step.")
    phase: str | None = Field(None, description="The trainer's phase (starting, training, evaluating, ...).")
    updated_at: str | None = Field(None, description="When the trainer last updated its progress (RFC 3339).")
    step_time: str | None = Field(
        None, description="When the operator last saw the step change (stall detection).")


class CheckpointStatus(Section):
    step: int | None = Field(None, description="Step of the newest committed checkpoint.")
    uri: str | None = Field(None, max_length=MAX_URI, description=f"Where it is (at most {MAX_URI} characters).")
    time: str | None = Field(None, description="When it was committed (RFC 3339).")


class ListedCheckpoint(Section):
    """A committed checkpoint."""

    step: int | None = Field(None, description="The checkpoint's step.")
    uri: str | None = Field(None, max_length=MAX_URI, description=f"Where it is (at most {MAX_URI} characters).")
    time: str | None = Field(None, description="When it was committed (RFC 3339).")


class Tracking(Section):
    """Operator bookkeeping that makes reconciling restart-safe; not for people."""

    launched: int = Field(0, description="Worker indexes started since the last launch (scale/loss detection).")
    replacing: dict[str, str] = Field(
        default_factory=dict,
        description="Worker index -> uid of the failed or lost pod already counted and being replaced.")
    last_failure_time: str | None = Field(None, description="When the last counted restart happened (backoff).")
    below_min_since: str | None = Field(None, description="Since when fewer than minNodes workers are alive.")
    restart_time: str | None = Field(None, description="When the workers were last (re)started (stall detection).")
    full_restart: bool = Field(False, description="All workers are being restarted: relaunch them together.")
    resizing: bool = Field(False, description="The restart under way re-forms the group at a new size after "
                                              "checkpointing the current step; not counted as a restart.")


class JobStatus(Section):
    """The observed state of an LLMTrainingJob, written by the operator."""

    phase: Phase | None = Field(
        None, description="Pending, Preparing, Running, Restarting, Suspended, Succeeded or Failed.")
    reason: str | None = Field(None, description="Why the job is in this phase (e.g. InvalidSpec, DeadlineExceeded).")
    message: str | None = Field(None, description="Details of the reason, naming the field or worker.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions, one per phase.")
    workers: WorkersStatus = Field(default_factory=WorkersStatus, description="Worker pod counts.")
    restarts: int = Field(0, description="Worker restarts so far (each counts toward runPolicy.maxRestarts).")
    progress: ProgressStatus | None = Field(None, description="Training progress read from worker 0.")
    checkpoint: CheckpointStatus | None = Field(None, description="The newest committed checkpoint.")
    checkpoints: list[ListedCheckpoint] | None = Field(
        None, max_length=CHECKPOINT_CATALOGUE_MAX,
        description="The committed checkpoints retention keeps (the newest checkpoint.keep), oldest first.")
    start_time: str | None = Field(None, description="When the workers were first launched (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job succeeded or failed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The metadata.generation last acted on.")
    selector: str | None = Field(None, description="Label selector of the worker pods (scale subresource).")
    tracking: Tracking | None = Field(None, description="Operator bookkeeping; do not edit.")
    kopf: dict[str, Any] | None = Field(None, description="Kopf framework state; do not edit.")
