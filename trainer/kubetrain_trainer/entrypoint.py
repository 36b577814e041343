"""A worker pod's main process: runs torchrun, forwards SIGTERM to it, and exits with the trainer's code.

torchrun exits 1 whatever its workers returned, so the operator could not tell a configuration error (exit
2, never retried) from a crash. The trainer records its error and exit code in `<output>/events.jsonl` (each
node's first process records an error there; the rest is rank 0's); this wrapper reads it, exits with that
code and writes the message to /dev/termination-log, where the operator reads it into the job's status,
after a first line with the run's final report (its last step, evaluation and checkpoint).

    python -m kubetrain_trainer.entrypoint --output DIR -- torchrun ... -m kubetrain_trainer.train ...

The rule it follows is kubetrain_api.contract.pod_outcome; this module is the process around it. It imports
nothing of torch, so it starts at once and stays small beside the trainer processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetrain_api.contract import (
    ENTRYPOINT_MODULE,
    EVENTS_FILE,
    FINAL_EVENT_KINDS,
    TERMINATION_LOG,
    final_report,
    pod_outcome,
    termination_message,
)


def run_events(events: Path, offset: int) -> list[dict[str, Any]]:
    """The trainer's events written since `offset` (this run's); unreadable lines are skipped."""
    found: list[dict[str, Any]] = []
    try:
        with events.open("rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    found.append(event)
    except OSError:
        pass
    return found


def trainer_outcome(events: Path, offset: int, torchrun_code: int, terminated: bool) -> tuple[int, str | None]:
    """The exit code and message to report, from the trainer's events written since `offset`."""
    final = [e for e in run_events(events, offset) if e.get("type") in FINAL_EVENT_KINDS]
    return pod_outcome(final[-1] if final else None, torchrun_code, terminated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ENTRYPOINT_MODULE)
    parser.add_argument("--output", required=True, help="the trainer's --output directory")
    parser.add_argument("--termination-log", default=TERMINATION_LOG)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- torchrun ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    events = Path(args.output) / EVENTS_FILE
    offset = events.stat().st_size if events.exists() else 0
    proc = subprocess.Popen(command)
    terminated = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal terminated
        terminated = True
        proc.send_signal(signum)  # torchrun passes it to the workers and waits for their checkpoint

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = proc.wait()
    final, message = trainer_outcome(events, offset, code, terminated)
    text = termination_message(message, final_report(run_events(events, offset), final == 0))
    if text:
        with contextlib.suppress(OSError):  # not in a pod
            Path(args.termination_log).write_text(text)
    if message:
        print(f"kubetrain: {message}", file=sys.stderr, flush=True)
    return final


if __name__ == "__main__":
    sys.exit(main())
