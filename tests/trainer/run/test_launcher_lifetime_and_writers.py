"""No trainer outlives its launcher (the parent-death signal on torchrun and on every trainer process:
`kubetrain run` or torchrun killed with SIGKILL), and a second live writer on a run's checkpoint prefix is
reported as such, naming the prefix, instead of as failed saves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from kubetrain_api.exit_codes import EXIT_CONFIG
from support import job_manifest, training_spec, wait_for, write_manifest
from support.runs import read_events, torchrun_cmd, trainer_env


def _gone(procs: list[psutil.Process]) -> bool:
    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(p) for p in procs)


def _long_job(prepared: Path, **checkpoint: object) -> dict:
    return job_manifest(spec=training_spec(prepared), training={"maxSteps": 100000, "evalEvery": 0, "compile": False},
                        checkpoint={"everySteps": 0, **checkpoint})


def _training(proc: subprocess.Popen, out: Path) -> list[psutil.Process]:
    """Once `proc` (a launcher) trains: its descendants, a trainer among them."""
    wait_for(lambda: read_events(out, "step"), timeout=180, what="training steps")
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert any("kubetrain_trainer.train" in " ".join(p.cmdline()) for p in descendants), descendants
    return descendants


def test_no_trainer_outlives_a_sigkilled_launcher(prepared: Path, tmp_path: Path) -> None:
    procs: list[psutil.Process] = []
    try:
        # torchrun killed: its trainer dies with it (its parent-death signal is SIGKILL)
        spec = _long_job(prepared)["spec"]
        config = tmp_path / "config.json"
        config.write_text(json.dumps({k: spec[k] for k in ("model", "tokenizer", "data", "training", "checkpoint",
                                                           "metrics")}))
        torchrun = subprocess.Popen(torchrun_cmd(1, config, tmp_path / "torchrun-killed"), env=trainer_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = _training(torchrun, tmp_path / "torchrun-killed")
        torchrun.kill()
        wait_for(lambda: _gone(procs), timeout=60, what="the trainer to die with torchrun")
        # `kubetrain run` killed: torchrun gets SIGTERM, the trainer checkpoints and exits, nothing is left
        manifest = write_manifest(tmp_path / "job.yaml", _long_job(prepared))
        run = subprocess.Popen([sys.executable, "-m", "kubetrain_cli", "run", str(manifest), "--output",
                                str(tmp_path / "run-killed")], env=trainer_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        procs = _training(run, tmp_path / "run-killed")
        os.kill(run.pid, signal.SIGKILL)
        wait_for(lambda: _gone(procs), timeout=120, what="torchrun and the trainer to end with kubetrain run")
        assert read_events(tmp_path / "run-killed", "preempted")
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_a_second_writer_on_the_checkpoint_prefix_is_reported_naming_it(prepared: Path, tmp_path: Path) -> None:
    """While the run trains, another writer commits step 50 under its checkpoint.uri: the run's own commit
    of step 50 finds it, and the run stops at its next save with exit 2 and that diagnosis, not after
    checkpoint.maxConsecutiveFailures failed saves (before: a failed save reported, and training went on)."""
    ckpts = tmp_path / "shared-checkpoints"
    spec = job_manifest(spec=training_spec(prepared), training={"maxSteps": 300, "evalEvery": 0},
                        checkpoint={"everySteps": 25, "uri": str(ckpts)})["spec"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: spec[k] for k in ("model", "tokenizer", "data", "training", "checkpoint",
                                                       "metrics")}))
    out = tmp_path / "out"
    proc = subprocess.Popen(torchrun_cmd(1, config, out), env=trainer_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: read_events(out, "start"), timeout=180, what="the trainer's start")
    other = ckpts / "step-000000050"  # 50 steps ahead of the trainer (about 2 s here)
    other.mkdir(parents=True)
    (other / "COMMITTED").write_text(json.dumps({"step": 50, "attempt": "a-otherwriter", "files": {}}))
    output, _ = proc.communicate(timeout=300)
    error = read_events(out, "error")
    assert error and error[-1]["exitCode"] == EXIT_CONFIG, output[-3000:]
    assert error[-1]["message"].startswith(f"checkpoint.uri: another writer is saving checkpoints to {ckpts} "
                                           f"(step 50 was committed by attempt a-otherwriter")
    assert [e["step"] for e in read_events(out, "checkpoint_failed")] == [50]
    assert max(e["step"] for e in read_events(out, "step")) == 75  # stopped at the next save
