"""`kubetrain run` end to end (kubetrain_trainer.run and the trainer it launches): the real CLI launching real
torchrun processes (gloo on CPU): summary, export, fine-tuning, layouts, kill -9 and SIGTERM resumes, refusals."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support import job_manifest, training_spec, wait_for, write_manifest
from support.runs import kill9_tree, read_events, run_cli, step_losses, torchrun_cmd, trainer_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete 2-process DDP run with export, as a user runs it."""
    d = tmp_path_factory.mktemp("run")
    manifest = write_manifest(d / "job.yaml", job_manifest(
        spec=training_spec(prepared), training={"maxSteps": 40, "evalEvery": 20, "parallelism": "ddp"},
        checkpoint={"everySteps": 20, "exportHF": True}, workers={"procPerNode": 2}))
    result = run_cli("run", manifest, "--output", d / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    (d / "stdout.txt").write_text(result.stdout)
    return d / "out"


def test_run_writes_summary_plot_and_falling_validation_loss(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["worldSize"] == 2 and summary["parallelism"] == "ddp"
    assert [e["step"] for e in summary["evaluations"]] == [0, 20, 40]
    assert summary["initialValidationLoss"] == pytest.approx(summary["evaluations"][0]["loss"])
    # Starts near ln(vocab) (uniform guess) and ends far below it.
    assert summary["initialValidationLoss"] > 6.0
    assert summary["validationLoss"] < summary["initialValidationLoss"] - 1.0
    assert summary["validationPerplexity"] == pytest.approx(math.exp(summary["validationLoss"]), rel=1e-6)
    assert summary["tokensPerSecond"] > 0 and summary["parameters"] > 0 and summary["flopsPerToken"] > 0
    assert summary["sample"]["text"].strip()
    assert (finished_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = (finished_run.parent / "stdout.txt").read_text()
    assert "validation loss" in stdout and "sample:" in stdout


def test_exported_model_loads_with_from_pretrained(finished_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(finished_run / "model")
    tok = AutoTokenizer.from_pretrained(finished_run / "model")
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # The export holds the trained weights: its validation loss is the run's final one.
    from kubetrain_trainer.shards import TokenShards

    summary = json.loads((finished_run / "summary.json").read_text())
    val = TokenShards(json.loads((finished_run / "trainer-config.json").read_text())["data"]["validation"], 64)
    batch = val.batch(np.arange(min(len(val), 16)))
    with torch.no_grad():
        out = model(batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert abs(loss - summary["validationLoss"]) < 0.5


def test_fine_tune_from_exported_model_starts_where_it_ended(finished_run: Path, prepared: Path,
                                                           tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "ft.yaml", job_manifest(
        spec=training_spec(prepared), model={"initFrom": str(finished_run / "model")},
        tokenizer={"path": str(finished_run / "model")},
        training={"maxSteps": 3, "evalEvery": 0}))
    result = run_cli("run", manifest, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    source = json.loads((finished_run / "summary.json").read_text())
    tuned = json.loads((tmp_path / "out" / "summary.json").read_text())
    # Same weights, same validation set (world size 1 vs 2 does not change the evaluation).
    assert tuned["initialValidationLoss"] == pytest.approx(source["validationLoss"], abs=1e-4)


def test_layouts_do_not_change_the_math(prepared: Path, tmp_path: Path) -> None:
    """Single process, DDP and FSDP2 (2 gloo processes), activation checkpointing and torch.compile
    give the same evaluation and step losses."""
    variants = {  # name: (nproc, parallelism, activationCheckpointing, compile)
        "single": (1, "ddp", False, False),
        "ddp": (2, "ddp", False, False),
        "fsdp": (2, "fsdp", True, False),
        "compiled": (1, "ddp", True, True),
    }
    losses, evals = {}, {}
    for name, (nproc, parallelism, ac, compiled) in variants.items():
        manifest = write_manifest(tmp_path / f"{name}.yaml", job_manifest(
            spec=training_spec(prepared), training={"maxSteps": 6, "evalEvery": 0, "parallelism": parallelism,
                                "activationCheckpointing": ac, "compile": compiled},
            checkpoint={"everySteps": 0}))
        out = tmp_path / name
        result = run_cli("run", manifest, "--output", out, "--nproc", nproc)
        assert result.returncode == 0, result.stderr
        start = read_events(out, "start")[0]
        assert start["parallelism"] == ("single" if nproc == 1 else parallelism) and start["worldSize"] == nproc
        losses[name] = step_losses(out)
        evals[name] = [e["loss"] for e in read_events(out, "eval")]
    for name in ("ddp", "fsdp", "compiled"):
        tolerance = 1e-3 if name == "compiled" else 1e-4  # inductor fuses ops: float rounding differs
        assert evals[name][0] == pytest.approx(evals["single"][0], rel=tolerance / 10)
        for step in range(1, 7):
            assert losses[name][step] == pytest.approx(losses["single"][step], rel=tolerance), (name, step)


def test_resume_after_kill9_continues_exactly(prepared: Path, tmp_path: Path) -> None:
    """Train 2N steps straight; separately train, kill -9 after the step-N commit, resume to 2N:
    the steps after the resume have exactly the uninterrupted losses, and nothing partial is loaded."""
    spec = job_manifest(spec=training_spec(prepared), training={"maxSteps": 40, "globalBatchSize": 16, "evalEvery": 0},
                        checkpoint={"everySteps": 20, "keep": 3})["spec"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: spec[k] for k in ("model", "tokenizer", "data", "training", "checkpoint",
                                                       "metrics")}))
    straight = tmp_path / "straight"
    subprocess.run(torchrun_cmd(2, config, straight), check=True, env=trainer_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(2, config, killed), env=trainer_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(e["step"] == 20 for e in read_events(killed, "checkpoint"))
             and any(e["step"] >= 22 for e in read_events(killed, "step")), what="steps past the step-20 commit")
    assert proc.poll() is None, "finished before it could be killed"
    kill9_tree(proc.pid)  # like a lost node: torchrun and every worker (each in its own session) at once
    proc.wait()
    ckpts = killed / "checkpoints"
    committed = sorted(p.name for p in ckpts.iterdir() if (p / "COMMITTED").exists())
    assert committed == ["step-000000020"]

    subprocess.run(torchrun_cmd(2, config, killed), check=True, env=trainer_env(), capture_output=True)
    starts = read_events(killed, "start")
    assert [s["startStep"] for s in starts] == [0, 20]
    reference, resumed = step_losses(straight), step_losses(killed)
    assert [resumed[s] for s in range(21, 41)] == [reference[s] for s in range(21, 41)]


def test_sigterm_checkpoints_mid_run_and_resume_continues(prepared: Path, tmp_path: Path) -> None:
    """Preemption: SIGTERM finishes the step, commits a checkpoint there, exits 143; rerun resumes.
    Meanwhile the live /metrics and /progress endpoints are scraped over HTTP."""
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        spec=training_spec(prepared), training={"maxSteps": 400, "globalBatchSize": 16, "evalEvery": 0},
        checkpoint={"everySteps": 0}, workers={"procPerNode": 2}))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "kubetrain_cli", "run", str(manifest), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: len(read_events(out, "step")) >= 5, what="five steps")
    port = read_events(out, "start")[0]["metricsPort"]
    progress = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5))
    assert progress["step"] >= 5 and progress["maxSteps"] == 400 and progress["loss"] > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("kubetrain_loss", "kubetrain_eval_loss", "kubetrain_learning_rate", "kubetrain_grad_norm",
                 "kubetrain_tokens_per_second", "kubetrain_mfu_ratio", "kubetrain_step_duration_seconds",
                 "kubetrain_data_wait_seconds", "kubetrain_checkpoint_save_seconds",
                 "kubetrain_checkpoint_last_step", "kubetrain_tokens"):
        assert name in families, name
    assert families["kubetrain_step"].samples[0].value >= 5
    assert 0 < families["kubetrain_mfu_ratio"].samples[0].value < 1
    assert not any("job" in s.labels for f in families.values() for s in f.samples)

    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    preempted = read_events(out, "preempted")[0]["step"]
    assert 5 <= preempted < 400
    assert f"checkpoint at step {preempted} committed" in stdout
    assert (out / "checkpoints" / f"step-{preempted:09d}" / "COMMITTED").exists()

    manifest.write_text(manifest.read_text().replace("maxSteps: 400", f"maxSteps: {preempted + 3}"))
    result = run_cli("run", manifest, "--output", out)
    assert result.returncode == 0, result.stderr
    assert read_events(out, "start")[-1]["startStep"] == preempted
    assert max(step_losses(out)) == preempted + 3


def test_non_finite_loss_stops_naming_the_step(prepared: Path, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        spec=training_spec(prepared), training={"maxSteps": 30, "evalEvery": 0, "gradClip": 0, "optimizer": {"lr": 1e6},
                            "schedule": {"warmupSteps": 0, "decay": "constant"}},
        checkpoint={"everySteps": 0}))
    result = run_cli("run", manifest, "--output", tmp_path / "out")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "is not finite" in result.stderr and "step " in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_from_another_model_is_refused_before_launch(finished_run: Path, prepared: Path,
                                                               tmp_path: Path) -> None:
    wider = dict(json.loads((finished_run / "trainer-config.json").read_text())["model"]["config"], hidden_size=128)
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        spec=training_spec(prepared), model={"config": wider}, checkpoint={"uri": str(finished_run / "checkpoints")}))
    result = run_cli("run", manifest, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert "checkpoint.uri" in result.stderr and "different model architecture" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "train.log").exists()
