"""`kubetrain run job.yaml`: manifest → prepared inputs → preflight → torchrun → summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kubetrain_api.contract import EVENTS_FILE, MODEL_DIR, RESULTS_FILE
from kubetrain_api.exit_codes import EXIT_PREEMPTED
from kubetrain_api.manifest import LLMTrainingJob

from ..checkpoint import checkpoint_uri
from ..errors import StorageUnavailableError
from .preflight import preflight
from .prepare import prepare_inputs
from .progress_bar import Progress
from .summary import generate_sample, plot_losses, print_summary
from .supervise import last_event, launch


def run(job: LLMTrainingJob, output: str | None, nproc: int | None, prompt: str | None = None) -> int:
    """The `kubetrain run` command on a loaded manifest; returns its exit code (kubetrain_api.exit_codes)."""
    out = Path(output or Path("runs") / job.metadata.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nproc = nproc or job.spec.workers.proc_per_node
    print(f"kubetrain run: job {job.metadata.name}, {nproc} process(es), output {out}")
    try:
        cfg = prepare_inputs(job.spec.trainer_config(), out)
        if cfg.checkpoint.uri is None:
            cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
                update={"uri": checkpoint_uri(cfg, out)})})
        preflight(cfg, nproc, out)
    except StorageUnavailableError as exc:  # one line, as for a ConfigError, but the code that says "retry"
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    progress = Progress(cfg.training.max_steps)
    code, since = launch(cfg, out, nproc, progress)
    if progress.tty:
        print()
    if code != 0:
        return _report_failure(code, out, since)
    results = json.loads((out / RESULTS_FILE).read_text())
    summary = dict(results)
    if cfg.checkpoint.export_hf:
        summary["sample"] = generate_sample(out / MODEL_DIR, prompt, str(cfg.data.validation), cfg.data.seq_length,
                                            s3=cfg.s3, seed=cfg.training.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_losses(results, out / "loss.png")
    print_summary(summary, out)
    return 0


def _report_failure(code: int, out: Path, since: int) -> int:
    """Say why training stopped (preempted: rerun to resume; the trainer's own error message; else the end
    of train.log) and return the exit code for it. `since`: where this run's events start."""
    events = out / EVENTS_FILE
    preempted = last_event(events, "preempted", since)
    if code == EXIT_PREEMPTED or preempted:
        step = preempted["step"] if preempted else "?"
        print(f"stopped: checkpoint at step {step} committed; run the same command to resume")
        return EXIT_PREEMPTED
    err = last_event(events, "error", since)
    if err:
        print(f"error: {err['message']}", file=sys.stderr)
        return int(err.get("exitCode", code))
    tail = (out / "train.log").read_text(errors="replace").splitlines()[-30:]
    print(f"training failed (exit code {code}); the end of {out / 'train.log'}:\n" + "\n".join(tail),
          file=sys.stderr)
    return code if 0 < code < 256 else 1
