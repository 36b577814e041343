"""The contract of kubetrain_api.contract, checked on both sides of it: what the operator renders is what the
trainer parses, what the trainer writes is what the entrypoint, `kubetrain run` and the operator read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetrain_api.contract import (
    CHECKPOINT_CATALOGUE_MAX,
    EVENT_KINDS,
    EVENTS_FILE,
    PROGRESS_KEYS,
    REPORT_MAX_CHARS,
    REPORT_PREFIX,
    TERMINATION_MESSAGE_CHARS,
    checkpoint_catalogue,
    entrypoint_argv,
    final_report,
    parse_termination_message,
    pod_outcome,
    termination_message,
    trainer_argv,
)
from kubetrain_api.exit_codes import EXIT_CONFIG, EXIT_PREEMPTED
from kubetrain_api.manifest import JobSpec
from kubetrain_operator.progress import progress_patch
from kubetrain_operator.render import JobRef, container_command
from kubetrain_trainer import entrypoint, train
from kubetrain_trainer.events import Events
from kubetrain_trainer.metrics import ProgressState


def test_the_trainer_parses_what_the_operator_renders_and_a_bad_config_exits_2(tmp_path: Path) -> None:
    sections = {"data": {"train": "/data/train"}, "tokenizer": {"path": "/data/tokenizer"}}
    spec = JobSpec.model_validate(sections)
    command = container_command(JobRef("llama", "ml", "uid-1"), spec)
    torchrun = command[command.index("--") + 1:]
    assert command == entrypoint_argv("/var/run/kubetrain/output", torchrun)
    assert torchrun[-6:] == trainer_argv("/etc/kubetrain/config.json", "/var/run/kubetrain/output")

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**sections, "training": {"maxSteps": 0}}))
    argv = trainer_argv(str(config), str(tmp_path / "out"))[2:]  # after `-m kubetrain_trainer.train`
    assert train.main(argv) == EXIT_CONFIG
    events = tmp_path / "out" / EVENTS_FILE
    code, message = entrypoint.trainer_outcome(events, 0, 1, False)  # torchrun's own code is 1
    assert code == EXIT_CONFIG and message is not None and "training.maxSteps" in message


def test_every_nodes_first_process_records_the_error_for_its_own_pod(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": {"train": "/data/train"}, "tokenizer": {"path": "/data/tokenizer"},
                                  "training": {"maxSteps": 0}}))
    for rank, local_rank, out in ((3, 0, "node-1"), (4, 1, "node-1-second")):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert train.main(trainer_argv(str(config), str(tmp_path / out))[2:]) == EXIT_CONFIG
    # Worker 1's pod (global rank 3 is its local rank 0) exits 2 like worker 0's; its other processes write nothing
    assert entrypoint.trainer_outcome(tmp_path / "node-1" / EVENTS_FILE, 0, 1, False)[0] == EXIT_CONFIG
    assert not (tmp_path / "node-1-second" / EVENTS_FILE).exists() or \
        not (tmp_path / "node-1-second" / EVENTS_FILE).read_text()


def test_pod_outcome_follows_the_last_final_event() -> None:
    assert pod_outcome(None, 0, True) == (0, None)  # success wins, even after a SIGTERM
    assert pod_outcome({"type": "preempted", "step": 40}, 1, True) == (
        EXIT_PREEMPTED, "preempted: checkpoint at step 40 committed")
    assert pod_outcome({"type": "error", "exitCode": 3, "message": "x" * 9000}, 1, False) == (
        3, "x" * TERMINATION_MESSAGE_CHARS)
    assert pod_outcome({"type": "error", "exitCode": 999}, 1, False) == (1, None)  # not an exit code
    assert pod_outcome(None, 1, True) == (EXIT_PREEMPTED, "terminated by SIGTERM")
    assert pod_outcome(None, -9, False) == (1, None)


def test_the_trainer_writes_only_the_contracts_event_kinds(tmp_path: Path) -> None:
    events = Events(tmp_path / EVENTS_FILE)
    for kind in sorted(EVENT_KINDS):
        events.emit(kind, step=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown event kind 'stepp'"):
        events.emit("stepp", step=1)  # type: ignore[arg-type]
    written = [json.loads(line)["type"] for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    assert written == sorted(EVENT_KINDS)


def test_progress_holds_only_the_contracts_keys_and_the_operator_reads_it() -> None:
    progress = ProgressState(max_steps=100)
    checkpoint = {"step": 5, "uri": "s3://b/p/step-5", "time": "2026-12-01T10:00:00Z"}
    progress.update(step=7, loss=2.5, phase="training", evalPerplexity=12.3456, checkpoint=checkpoint,
                    checkpoints=[checkpoint])
    with pytest.raises(ValueError, match="evalLos"):
        progress.update(evalLos=1.0)
    snapshot = progress.snapshot()
    assert set(snapshot) <= PROGRESS_KEYS
    patch = progress_patch({}, json.loads(json.dumps(snapshot)), 1000.0)
    assert patch["progress"]["step"] == 7 and patch["progress"]["maxSteps"] == 100
    assert patch["progress"]["loss"] == 2.5 and patch["progress"]["phase"] == "training"
    assert patch["checkpoint"] == {"step": 5, "uri": "s3://b/p/step-5", "time": "2026-12-01T10:00:00Z"}
    assert patch["checkpoints"] == [patch["checkpoint"]] and patch["progress"]["evalPerplexity"] == 12.35


def test_the_final_report_travels_in_the_termination_message_ahead_of_the_message() -> None:
    listed = [{"step": 30, "uri": "s3://b/job/step-000000030", "time": 900.0},
              {"step": 45, "uri": "s3://b/job/step-000000045", "time": 1000.0}]
    events = [{"type": "start"}, {"type": "step", "step": 44, "loss": 2.5},
              {"type": "eval", "loss": 2.75, "perplexity": 15.64},
              {"type": "step", "step": 45, "loss": 2.4},
              {"type": "checkpoint", "step": 45, "path": "s3://b/job/step-000000045", "time": 1000.7,
               "committedAt": 1000.0, "checkpoints": listed},
              {"type": "preempted", "step": 45}]
    report = final_report(events, succeeded=False)  # the commit's time, as in the catalogue, not the event's
    assert report == {"step": 45, "loss": 2.4, "evalLoss": 2.75, "evalPerplexity": 15.64,
                      "checkpoint": {"step": 45, "uri": "s3://b/job/step-000000045", "time": 1000.0},
                      "checkpoints": listed}
    assert set(report) <= PROGRESS_KEYS and final_report(events, succeeded=True)["phase"] == "done"
    text = termination_message("preempted: checkpoint at step 45 committed", report)
    assert text is not None and len(text.encode()) < 4096
    assert parse_termination_message(text) == ("preempted: checkpoint at step 45 committed", report)
    assert parse_termination_message(termination_message(None, report)) == (None, report)
    assert final_report([{"type": "error", "message": "bad"}], succeeded=False) == {}
    # Anything else is a message, whoever's container wrote it.
    for other in ("plain text", f"{REPORT_PREFIX}not json\nmore", f"{REPORT_PREFIX}[1, 2]", None):
        assert parse_termination_message(other) == (other, None)


def test_the_catalogue_lists_the_newest_keep_committed_checkpoints_and_stays_short() -> None:
    entries = [{"step": s, "uri": f"s3://b/job/step-{s:09d}", "time": float(s)} for s in (40, 10, 30, 20)]
    assert [e["step"] for e in checkpoint_catalogue(entries, keep=3)] == [20, 30, 40]  # oldest first
    again = {"step": 40, "uri": "s3://b/job/step-000000040", "time": 41.0}  # the same step, later: it wins
    assert checkpoint_catalogue([*entries, again], keep=1) == [again]
    many = [{"step": s, "uri": "u", "time": 0.0} for s in range(20)]
    assert [e["step"] for e in checkpoint_catalogue(many, keep=100)] == list(range(20 - CHECKPOINT_CATALOGUE_MAX, 20))


def test_a_report_with_long_uris_drops_the_oldest_listed_checkpoints_to_fit_its_budget() -> None:
    uri = "s3://bucket/" + "p" * 400 + "/step-"
    listed = [{"step": s, "uri": f"{uri}{s:09d}", "time": float(s)} for s in range(1, 6)]
    events = [{"type": "step", "step": 5, "loss": 1.0, "time": 9.0},
              {"type": "checkpoint", "step": 5, "path": f"{uri}000000005", "time": 9.0, "checkpoints": listed}]
    report = final_report(events, succeeded=False)
    line = termination_message(None, report)
    assert line is not None and len(line) <= len(REPORT_PREFIX) + REPORT_MAX_CHARS < TERMINATION_MESSAGE_CHARS
    assert 0 < len(report["checkpoints"]) < 5 and report["checkpoints"] == listed[-len(report["checkpoints"]):]
    assert report["checkpoint"]["step"] == 5  # the newest checkpoint itself always stays
    text = termination_message("x" * TERMINATION_MESSAGE_CHARS, report)
    assert text is not None
    kept = text.encode()[:4096].decode(errors="ignore")  # what the kubelet keeps of a longer message
    assert parse_termination_message(kept)[1] == report
