"""kubetrain_trainer.entrypoint, the worker pods' entrypoint: it runs torchrun's command and reports the
trainer's exit code and error (from its events) as the container's exit and termination message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kubetrain_api.contract import parse_termination_message
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


def test_on_success_the_termination_message_holds_the_final_report(tmp_path: Path) -> None:
    script = ("import json,sys; f=open(sys.argv[1],'a')\n"
              "for e in ({'type':'step','step':12,'loss':2.5,'time':5.0},\n"
              "          {'type':'eval','loss':2.75,'perplexity':15.6,'time':6.0}):\n"
              "    f.write(json.dumps(e)+'\\n')\n")
    log = tmp_path / "termination-log"
    code = entrypoint.main(["--output", str(tmp_path), "--termination-log", str(log), "--",
                            sys.executable, "-c", script, str(tmp_path / "events.jsonl")])
    assert code == 0
    assert parse_termination_message(log.read_text()) == (
        None, {"step": 12, "loss": 2.5, "evalLoss": 2.75, "evalPerplexity": 15.6, "phase": "done", "updatedAt": 6.0})
