"""The contract between the trainer, the launcher (`kubetrain run`), the pod entrypoint and the operator.

Four processes meet here and nowhere else:

- the **trainer** (`python -m kubetrain_trainer.train --config FILE --output DIR`, one per device, under
  torchrun) writes `DIR/events.jsonl` (rank 0), `DIR/results.json` and `DIR/model/`, serves `/progress`
  (rank 0) and exits with a code of `exit_codes`;
- **`kubetrain run`** starts torchrun with `trainer_argv` and follows `events.jsonl` for its progress bar;
- the **pod entrypoint** (`python -m kubetrain_trainer.entrypoint --output DIR -- torchrun ...`, the
  worker container's command) runs torchrun, forwards SIGTERM, and exits with what `pod_outcome` says,
  writing the message and the final report (`final_report`) to the termination log;
- the **operator** renders `entrypoint_argv(...)` as the worker's command, reads `/progress` of worker 0
  into status.progress, the final report of an ended worker 0 too (the last step, evaluation and
  checkpoint, which no poll of /progress may have seen), and classifies a failed pod by its exit code and
  termination message.

Standard library only.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict

from .exit_codes import EXIT_PREEMPTED

# --- the trainer's command line ---------------------------------------------------------------------------
TRAINER_MODULE = "kubetrain_trainer.train"
ENTRYPOINT_MODULE = "kubetrain_trainer.entrypoint"
CONFIG_FLAG = "--config"  # the trainer config: JSON, camelCase (TrainerConfig.to_wire())
OUTPUT_FLAG = "--output"  # the directory the trainer writes the files below into


def trainer_argv(config: str, output: str) -> list[str]:
    """What follows `torchrun <its options>`: the trainer module and its two arguments."""
    return ["-m", TRAINER_MODULE, CONFIG_FLAG, config, OUTPUT_FLAG, output]


def entrypoint_argv(output: str, command: list[str]) -> list[str]:
    """A worker container's command: the entrypoint wrapping `command` (torchrun ...)."""
    return ["python", "-m", ENTRYPOINT_MODULE, OUTPUT_FLAG, output, "--", *command]


# --- files under --output ---------------------------------------------------------------------------------
EVENTS_FILE = "events.jsonl"  # rank 0's append-only log, one JSON object per line
RESULTS_FILE = "results.json"  # written when training ends
MODEL_DIR = "model"  # the Hugging Face export (checkpoint.exportHf)
TERMINATION_LOG = "/dev/termination-log"  # the pod's terminationMessagePath (Kubernetes' default)
TERMINATION_MESSAGE_CHARS = 3500  # the kubelet keeps 4096 bytes; leave room for multi-byte characters

# --- events.jsonl: {"type": <kind>, "time": <unix seconds>, ...fields} ------------------------------------
EventKind = Literal["start", "step", "compile", "eval", "checkpoint", "checkpoint_failed", "preempted", "error", "done"]
EVENT_KINDS: frozenset[str] = frozenset(EventKind.__args__)  # type: ignore[attr-defined]
# Fields: step {step, loss, lr, gradNorm, tokensPerSecond, mfu, seconds, dataWait, eta}; eval {step, loss,
# perplexity}; compile {firstStepSeconds, cacheRestored, cacheHits, cacheMisses, storedBytes, cacheUri} (after
# a compiled run's first step); checkpoint {step, seconds, blockedSeconds, bytes, path, committedAt (unix
# seconds, the time the catalogue and /progress give it), checkpoints (the catalogue after it)};
# checkpoint_failed {step, error}; preempted {step (the committed one), uncommittedStep?}; error {message,
# exitCode}; done (results.json).


# --- GET /progress on rank 0's metrics port ---------------------------------------------------------------
PROGRESS_PATH = "/progress"
HEALTH_PATH = "/healthz"  # every node's metrics server; the worker's readiness probe
METRICS_PATH = "/metrics"

TrainerPhase = Literal["starting", "training", "exporting", "done"]


class ProgressCheckpoint(TypedDict):
    step: int
    uri: str
    time: float  # unix seconds


class Progress(TypedDict, total=False):
    """The JSON object rank 0 serves; the operator copies it into status.progress, status.checkpoint and
    status.checkpoints."""

    step: int
    maxSteps: int
    loss: float | None
    evalLoss: float | None
    evalPerplexity: float | None
    tokensPerSecond: float | None
    mfu: float | None
    etaSeconds: float | None
    phase: TrainerPhase
    updatedAt: float  # unix seconds
    checkpoint: ProgressCheckpoint | None
    checkpoints: list[ProgressCheckpoint]  # the catalogue: committed ones retention keeps, oldest first
    checkpointFailures: int
    lastCheckpointError: str


PROGRESS_KEYS: frozenset[str] = frozenset(Progress.__annotations__)
PROGRESS_NUMBERS = ("loss", "evalLoss", "evalPerplexity", "tokensPerSecond", "mfu", "etaSeconds")  # or null
# The catalogue is short whatever checkpoint.keep says: it travels in the termination message and in status.
CHECKPOINT_CATALOGUE_MAX = 5


def checkpoint_catalogue(entries: list[ProgressCheckpoint], keep: int) -> list[ProgressCheckpoint]:
    """The committed checkpoints to list, oldest first: the newest `keep` (the ones retention leaves), at
    most CHECKPOINT_CATALOGUE_MAX, one per step (a later entry for a step replaces an earlier one)."""
    by_step = {entry["step"]: entry for entry in entries}
    newest = sorted(by_step)[-max(1, min(keep, CHECKPOINT_CATALOGUE_MAX)):]
    return [by_step[step] for step in newest]


# --- the pod entrypoint's rule ----------------------------------------------------------------------------
FINAL_EVENT_KINDS = ("error", "preempted")  # the last of these since torchrun started decides the outcome


def pod_outcome(last: dict[str, Any] | None, torchrun_code: int, terminated: bool) -> tuple[int, str | None]:
    """The exit code and termination message of a worker container, from the last final event the trainer
    wrote (None: none), torchrun's exit code and whether SIGTERM reached the entrypoint."""
    if torchrun_code == 0:
        return 0, None
    if last is not None and last.get("type") == "preempted":
        return EXIT_PREEMPTED, f"preempted: checkpoint at step {last.get('step')} committed"
    if last is not None:
        code = last.get("exitCode")
        code = code if isinstance(code, int) and 0 < code < 256 else torchrun_code
        return code, str(last.get("message") or "")[:TERMINATION_MESSAGE_CHARS] or None
    if terminated:  # SIGTERM reached us (deletion, preemption) and the trainer did not say more
        return EXIT_PREEMPTED, "terminated by SIGTERM"
    return (torchrun_code if 0 < torchrun_code < 256 else 1), None


# --- the termination message: the final report, then the message for people -------------------------------
REPORT_PREFIX = "kubetrain-report: "  # first line; the kubelet keeps the first 4096 bytes, so it goes first
# The report line's budget: well inside TERMINATION_MESSAGE_CHARS, leaving the rest to the message for people.
REPORT_MAX_CHARS = 1500


def final_report(events: list[dict[str, Any]], succeeded: bool) -> Progress:
    """What rank 0's events since torchrun started say of the run's end, as /progress would have: the last
    step and its loss, the last evaluation, the newest committed checkpoint (a SIGTERM one included) and the
    catalogue the last commit left, cut to REPORT_MAX_CHARS."""
    report: Progress = {}
    for event in events:
        kind = event.get("type")
        if kind == "step" and isinstance(event.get("step"), int):
            report["step"], report["loss"] = event["step"], event.get("loss")
        elif kind == "eval":
            report["evalLoss"], report["evalPerplexity"] = event.get("loss"), event.get("perplexity")
        elif kind == "checkpoint" and isinstance(event.get("step"), int):
            when = event.get("committedAt", event.get("time"))  # (the event is written after the commit)
            report["checkpoint"] = {"step": event["step"], "uri": str(event.get("path") or ""),
                                    "time": float(when) if isinstance(when, (int, float)) else 0.0}
            if isinstance(event.get("checkpoints"), list):
                report["checkpoints"] = event["checkpoints"]
    if succeeded and report:
        report["phase"] = "done"
    last_time = events[-1].get("time") if events else None
    if report and isinstance(last_time, (int, float)):
        report["updatedAt"] = float(last_time)
    return within_budget(report)


def within_budget(report: Progress) -> Progress:
    """The report with the oldest catalogue entries dropped until its line fits REPORT_MAX_CHARS (long URIs),
    then without the catalogue; the rest is a few hundred characters."""
    report = report.copy()
    while len(json.dumps(report, separators=(",", ":"))) > REPORT_MAX_CHARS and report.get("checkpoints"):
        report["checkpoints"] = report["checkpoints"][1:]
    if "checkpoints" in report and not report["checkpoints"]:
        del report["checkpoints"]
    return report


def termination_message(message: str | None, report: Progress | dict[str, Any] | None) -> str | None:
    lines = [REPORT_PREFIX + json.dumps(report, separators=(",", ":"))] if report else []
    if message:
        lines.append(message[:TERMINATION_MESSAGE_CHARS])
    return "\n".join(lines) or None


def parse_termination_message(text: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """(the message for people, the final report) of a termination message. Anyone's container may write
    one: a report that is not a JSON object is treated as part of the message."""
    if not text or not text.startswith(REPORT_PREFIX):
        return text, None
    first, _, rest = text.partition("\n")
    try:
        report = json.loads(first[len(REPORT_PREFIX):])
    except ValueError:
        return text, None
    if not isinstance(report, dict):
        return text, None
    return rest or None, report
