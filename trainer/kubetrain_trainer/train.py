"""The training process (one per device, launched by torchrun): `python -m kubetrain_trainer.train`.

Inputs are a trainer config whose data paths are prepared shard directories and whose tokenizer is
a saved tokenizer; the launcher (`kubetrain run`) or a cluster init step prepares them.
Outputs under --output: events.jsonl (rank 0's step/eval/checkpoint log), results.json, model/.
The loop itself is trainer.py's Trainer; this module is its command line and its exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from kubetrain_api.config import TrainerConfig
from kubetrain_api.contract import CONFIG_FLAG, EVENTS_FILE, OUTPUT_FLAG, TRAINER_MODULE

from .errors import ConfigError, TrainerError
from .events import Events
from .preemption import die_with_parent
from .trainer import Trainer


def train(cfg: TrainerConfig, output: Path) -> dict[str, Any]:
    """Collective: the whole run (see Trainer); returns what results.json holds."""
    return Trainer(cfg, output).train()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=TRAINER_MODULE)
    parser.add_argument(CONFIG_FLAG, dest="config", required=True, help="trainer config (JSON, camelCase)")
    parser.add_argument(OUTPUT_FLAG, dest="output", required=True,
                        help="directory for events, results and the exported model")
    args = parser.parse_args(argv)
    # A native crash or abort (gloo, a C++ terminate) prints every thread's Python stack to the log, which
    # is all torchrun's error summary ("Signal 6 received") otherwise leaves to go on.
    faulthandler.enable()
    # torchrun killed (SIGKILL, OOM) leaves its workers leaderless: end with it rather than train on and commit.
    die_with_parent(signal.SIGKILL)()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    events = Events(output / EVENTS_FILE if rank == 0 else None)
    try:
        from kubetrain_api.config import format_validation_error
        from pydantic import ValidationError

        try:
            cfg = TrainerConfig.model_validate_json(Path(args.config).read_text())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from exc
        train(cfg, output)
        return 0
    except TrainerError as exc:
        # Every pod's entrypoint reports its own exit code from its own node's events.jsonl, so the first process
        # of every node records the error (rank 0's log alone holds the rest of the run). Else worker 1's pod
        # exits 1 (torchrun's code) and the operator could count a restart before worker 0's exit 2 shows.
        node_events = events if rank == 0 else Events(output / EVENTS_FILE if local_rank == 0 else None)
        node_events.emit("error", message=str(exc), exitCode=exc.exit_code)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


def exit_without_finalizing(code: int) -> NoReturn:
    """Leave the process with `code` once its output is flushed, skipping the interpreter's finalization.

    Why: the C++ process groups (gloo's worker threads and the work they hold) outlive
    destroy_process_group while DDP, FSDP's device mesh or DCP still reference them, and are then torn
    down during finalization, which sometimes aborts the process ("terminate called without an active
    exception", SIGABRT, no Python frame) after a run that finished and committed everything; torchrun then
    reports the run failed. Everything this process owes is on disk by now: events and logs are
    line-buffered, checkpoints committed, results written."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(code)


def run_as_script() -> NoReturn:
    try:
        code = main()
    except SystemExit as exc:  # the SIGTERM checkpoint's exit (Trainer.preempt), argparse's (both ints)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a bug: its traceback, and torchrun's exit code for a failed worker
        traceback.print_exc()
        code = 1
    exit_without_finalizing(code)


if __name__ == "__main__":
    run_as_script()
