"""Training with its checkpoints, data and export on S3 (moto_server on loopback): real torchrun processes
and `kubetrain run`, through a kill -9 mid-upload, a resume with another world size, an S3 outage, saves that
keep failing and an unreachable store, with the secret never in any output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubetrain_trainer.checkpoint import MARKER
from support import job_manifest, training_spec, wait_for, write_manifest
from support.runs import KUBETRAIN, kill9_tree, read_events, step_losses, torchrun_cmd
from support.s3 import CREDENTIALS, SECRET, MotoServer, incomplete_uploads, objects

# Big enough (22 MB of weights and AdamW state) that saves are multipart and split into objects.
S3_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 688}


def env() -> dict[str, str]:
    return {**os.environ, **CREDENTIALS, "OMP_NUM_THREADS": "1"}


def _config(tmp_path: Path, prepared: Path, s3: MotoServer, bucket: str, prefix: str, name: str,
            **training: Any) -> Path:
    spec = job_manifest(spec=training_spec(prepared), model={"config": S3_MODEL},
                        training={"evalEvery": 0, "globalBatchSize": 8, **training},
                        checkpoint={"uri": f"s3://{bucket}/{prefix}/", "everySteps": 10, "keep": 3},
                        s3=s3.s3_section())["spec"]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({k: spec[k] for k in ("model", "tokenizer", "data", "training", "checkpoint",
                                                     "metrics", "s3")}))
    return path


def _train(nproc: int, config: Path, output: Path) -> None:
    result = subprocess.run(torchrun_cmd(nproc, config, output), env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_kill9_mid_upload_resumes_exactly_from_the_previous_commit(s3: MotoServer, bucket: str, prepared: Path,
                                                                    tmp_path: Path) -> None:
    client = s3.client()
    reference = _config(tmp_path, prepared, s3, bucket, "kill-ref", "ref", maxSteps=30)
    _train(2, reference, tmp_path / "ref")
    config = _config(tmp_path, prepared, s3, bucket, "kill", "kill", maxSteps=30)
    slow = json.loads(config.read_text())
    slow["s3"]["maxConcurrency"] = 1  # parts one at a time: the upload stays in flight long enough to be hit
    config.write_text(json.dumps(slow))
    proc = subprocess.Popen(torchrun_cmd(2, config, tmp_path / "kill"), env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any("kill/step-000000020/" in k for k in incomplete_uploads(client, bucket)), timeout=180,
             what="the step-20 upload in flight")
    kill9_tree(proc.pid)
    proc.wait()
    keys = objects(client, bucket, "kill/")
    assert [k for k in keys if k.endswith(MARKER)] == [f"kill/step-000000010/{MARKER}"]
    assert incomplete_uploads(client, bucket)  # the dead writer could not abort its upload

    _train(2, config, tmp_path / "kill")
    assert [s["startStep"] for s in read_events(tmp_path / "kill", "start")] == [0, 10]
    assert incomplete_uploads(client, bucket) == []  # aborted on restart, and nothing new left behind
    ref, resumed = step_losses(tmp_path / "ref"), step_losses(tmp_path / "kill")
    assert [resumed[s] for s in range(11, 31)] == [ref[s] for s in range(11, 31)]
    committed = sorted(k for k in objects(client, bucket, "kill/") if k.endswith(MARKER))
    assert committed == [f"kill/step-0000000{n}/{MARKER}" for n in (10, 20, 30)]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resharding_resume_with_another_world_size(s3: MotoServer, bucket: str, prepared: Path, tmp_path: Path,
                                                   before: int, after: int) -> None:
    """FSDP2-sharded state saved by N processes at a SIGTERM loads into M, and training goes on exactly as an
    uninterrupted run: same batches (the sampler ignores the world size), same schedule, same AdamW state."""
    steps, client = 30, s3.client()
    reference = _config(tmp_path, prepared, s3, bucket, f"reshard-ref-{before}{after}", "ref", maxSteps=steps,
                        parallelism="fsdp")
    _train(2, reference, tmp_path / "ref")
    config = _config(tmp_path, prepared, s3, bucket, f"reshard-{before}{after}", "run", maxSteps=steps,
                     parallelism="fsdp")
    cmd = torchrun_cmd(before, config, tmp_path / "run")
    cmd.insert(cmd.index("--max-restarts=0"), "--shutdown-timeout=60")  # time for the SIGTERM checkpoint
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: f"reshard-{before}{after}/step-000000010/{MARKER}" in objects(client, bucket,
                                                                                  f"reshard-{before}{after}/"),
             timeout=240, what="the step-10 commit")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    preempted = read_events(tmp_path / "run", "preempted")[-1]["step"]
    assert 10 <= preempted < steps
    assert f"reshard-{before}{after}/step-{preempted:09d}/{MARKER}" in objects(client, bucket, "reshard-")

    _train(after, config, tmp_path / "run")
    starts = read_events(tmp_path / "run", "start")
    assert [(s["worldSize"], s["startStep"]) for s in starts] == [(before, 0), (after, preempted)]
    ref, run = step_losses(tmp_path / "ref"), step_losses(tmp_path / "run")
    resumed = range(preempted + 1, steps + 1)
    # Equal up to float rounding: the ranks reduce gradients in another order. Losing the AdamW moments or
    # a shifted schedule or data order moves the loss by far more than this.
    assert max(abs(run[s] - ref[s]) for s in resumed) < 2e-3, [(run[s], ref[s]) for s in resumed]


def test_s3_outage_during_an_upload_fails_cleanly_and_training_goes_on(s3: MotoServer, bucket: str, prepared: Path,
                                                                         tmp_path: Path) -> None:
    config = _config(tmp_path, prepared, s3, bucket, "outage", "outage", maxSteps=80)
    cfg = json.loads(config.read_text())
    cfg["s3"].update(maxConcurrency=1, maxAttempts=3)
    cfg["checkpoint"]["everySteps"] = 10
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(torchrun_cmd(2, config, out), env=env(), start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT)
    client = s3.client()
    wait_for(lambda: any("outage/step-" in k for k in incomplete_uploads(client, bucket)), timeout=180,
             what="an upload in flight")
    s3.stop()
    steps_at_stop = len(read_events(out, "step"))
    wait_for(lambda: len(read_events(out, "step")) >= steps_at_stop + 3, what="training to go on during the outage")
    s3.start()
    s3.client().create_bucket(Bucket=bucket)  # moto forgets everything when it stops
    proc.wait(timeout=600)
    output = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, f"exit code {proc.returncode}: {output[-3000:]}"
    assert SECRET not in output
    failed = read_events(out, "checkpoint_failed")
    committed = [e["step"] for e in read_events(out, "checkpoint")]
    assert failed, "the upload interrupted by the outage should have failed"
    assert all(e["error"] and SECRET not in e["error"] for e in failed)
    assert committed and committed[-1] == 80 and max(e["step"] for e in failed) < 80
    assert f"outage/step-000000080/{MARKER}" in objects(s3.client(), bucket, "outage/")


def test_failing_saves_stop_the_job_after_max_consecutive_failures(s3: MotoServer, bucket: str, prepared: Path,
                                                                    tmp_path: Path) -> None:
    client = s3.client()
    client.create_bucket(Bucket="fragile")
    config = _config(tmp_path, prepared, s3, bucket, "x", "fragile", maxSteps=200)
    cfg = json.loads(config.read_text())
    cfg["checkpoint"].update(uri="s3://fragile/job/", everySteps=3, maxConsecutiveFailures=2)
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(torchrun_cmd(2, config, out), env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(lambda: read_events(out, "checkpoint"), timeout=180, what="a first committed checkpoint")
    for key in objects(client, "fragile"):
        client.delete_object(Bucket="fragile", Key=key)
    client.delete_bucket(Bucket="fragile")  # every later save fails: NoSuchBucket
    proc.wait(timeout=300)
    failures = read_events(out, "checkpoint_failed")
    error = read_events(out, "error")[-1]
    assert proc.returncode != 0 and len(failures) >= 2, (tmp_path / "train.log").read_text()[-3000:]
    assert error["exitCode"] == 4 and "checkpoint saves in a row failed" in error["message"]
    assert "NoSuchBucket" in failures[0]["error"] and SECRET not in json.dumps(failures)


def test_unreachable_checkpoint_store_is_a_clear_error(s3: MotoServer, prepared: Path, tmp_path: Path) -> None:
    manifest = job_manifest(spec=training_spec(prepared), checkpoint={"uri": "s3://no-such-bucket/x/"},
                            s3=s3.s3_section())
    path = write_manifest(tmp_path / "job.yaml", manifest)
    result = subprocess.run([*KUBETRAIN, "run", str(path), "--output", str(tmp_path / "out")], env=env(),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "checkpoint.uri: cannot list s3://no-such-bucket/x/" in result.stderr and "NoSuchBucket" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr


def test_run_from_s3_data_to_s3_checkpoints_with_preemption_export_and_no_leaked_secret(
        s3: MotoServer, bucket: str, small_corpus: Path, tmp_path: Path) -> None:
    """The S3 user's whole path as one scenario, each step on the previous one's output: prepare to S3,
    train from it, SIGTERM (checkpoint), resume, export; then no secret anywhere in logs, events or objects."""
    cli_env = {**env(), "AWS_ENDPOINT_URL_S3": s3.endpoint}
    prep = subprocess.run([*KUBETRAIN, "prepare", "--input", str(small_corpus), "--train-tokenizer", "512",
                           "--validation-split", "0.2", "--output", f"s3://{bucket}/data/"],
                          env=cli_env, capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    assert "data/train/index.json" in objects(s3.client(), bucket, "data/")
    manifest = job_manifest(spec=training_spec(tmp_path), model={"config": S3_MODEL},
                            tokenizer={"path": f"s3://{bucket}/data/tokenizer/"},
                            data={"train": f"s3://{bucket}/data/train/", "validation": f"s3://{bucket}/data/validation/"},
                            training={"maxSteps": 400, "evalEvery": 0},
                            checkpoint={"uri": f"s3://{bucket}/job/", "everySteps": 4, "keep": 2, "exportHF": True},
                            workers={"procPerNode": 2}, s3=s3.s3_section())
    path = write_manifest(tmp_path / "job.yaml", manifest)
    out = tmp_path / "out"
    proc = subprocess.Popen([*KUBETRAIN, "run", str(path), "--output", str(out)], env=cli_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for(lambda: len(read_events(out, "checkpoint")) >= 3, timeout=240, what="three committed checkpoints")
    port = read_events(out, "start")[0]["metricsPort"]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    progress = urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5).read().decode()
    assert "kubetrain_checkpoint_blocked_seconds_count" in scraped and json.loads(progress)["checkpoint"]
    listed = json.loads(progress)["checkpoints"]  # the catalogue: what retention (keep 2) leaves, oldest first
    assert 1 <= len(listed) <= 2 and listed[-1] == json.loads(progress)["checkpoint"]
    assert all(c["uri"] == f"s3://{bucket}/job/step-{c['step']:09d}" for c in listed), listed
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    preempted = read_events(out, "preempted")[-1]["step"]
    keys = objects(s3.client(), bucket, "job/")
    assert f"job/step-{preempted:09d}/{MARKER}" in keys
    steps = sorted({k.split("/")[1] for k in keys if k.startswith("job/step-")})
    assert len(steps) == 2 and steps[-1] == f"step-{preempted:09d}"  # retention: keep 2, nothing partial

    path.write_text(path.read_text().replace("maxSteps: 400", f"maxSteps: {preempted + 4}"))
    result = subprocess.run([*KUBETRAIN, "run", str(path), "--output", str(out)], env=cli_env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert read_events(out, "start")[-1]["startStep"] == preempted

    download = tmp_path / "downloaded"
    client = s3.client()
    for key in objects(client, bucket, "job/hf/"):
        target = download / key.removeprefix("job/hf/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(download)
    tok = AutoTokenizer.from_pretrained(download)
    assert model.config.hidden_size == 256 and len(tok) == 512

    texts = [stdout, stderr, result.stdout, result.stderr, scraped, progress, path.read_text()]
    texts += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in
              (".log", ".jsonl", ".json", ".yaml", ".txt")]
    assert not any(SECRET in t for t in texts)
