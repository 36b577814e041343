"""kubetrain_trainer.entrypoint, the worker pods' entrypoint: it runs torchrun's command and reports the
trainer's exit code and error (from its events) as the container's exit and termination message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kubetrain_trainer import entrypoint


def test_entrypoint_reports_the_trainers_exit_code(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"type": "step", "step": 1}) + "\n")
    offset = events.stat().st_size
    with events.open("a") as f:
        f.write(json.dumps({"type": "error", "message": "spec.data.train: no input files", "exitCode": 2}) + "\n")
    assert entrypoint.trainer_outcome(events, offset, 1, False) == (2, "spec.data.train: no input files")
    assert entrypoint.trainer_outcome(events, events.stat().st_size, 1, False) == (1, None)
    assert entrypoint.trainer_outcome(events, events.stat().st_size, 1, True)[0] == 143
    assert entrypoint.trainer_outcome(tmp_path / "missing", 0, 0, False) == (0, None)


def test_entrypoint_runs_the_command_and_writes_the_termination_message(tmp_path: Path) -> None:
    script = ("import json,sys; open(sys.argv[1],'a').write(json.dumps({'type':'error','message':'bad seed',"
              "'exitCode':2})+'\\n'); sys.exit(1)")
    log = tmp_path / "termination-log"
    code = entrypoint.main(["--output", str(tmp_path), "--termination-log", str(log), "--",
                            sys.executable, "-c", script, str(tmp_path / "events.jsonl")])
    assert code == 2 and log.read_text() == "bad seed"
