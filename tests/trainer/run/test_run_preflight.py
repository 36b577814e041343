"""`kubetrain run`'s refusals before torchrun starts (kubetrain_trainer.run.preflight, and the manifest that
kubetrain_cli reads first): exit code 2, the field named, no traceback, no training process; storage that is
down at start exits 5 (retryable) instead."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetrain_api.exit_codes import EXIT_STORAGE_UNAVAILABLE
from support import free_port, job_manifest, training_spec, write_manifest
from support.runs import run_cli


@pytest.mark.parametrize(("change", "nproc", "expected"), [
    ({"model": {"preset": "gpt2"}}, 1, "spec.model.preset"),
    ({"training": {"globalBatchSize": 8, "microBatchSize": 4}}, 4, "training.microBatchSize (4) must divide"),
    ({"data": {"train": "/nonexistent/*.txt", "validation": None}}, 1, "data.train: no input files match"),
    ({"model": {"config": {"num_layers": 3}}}, 1, "model.config.num_layers: not a LlamaConfig field"),
    ({"workers": {"minNodes": 4, "maxNodes": 2}}, 1, "spec.workers.minNodes (4) must not exceed"),
])
def test_cli_rejects_bad_input_with_exit_2_and_no_traceback(prepared: Path, tmp_path: Path, change: dict,
                                                           nproc: int, expected: str) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(spec=training_spec(prepared), **change))
    result = run_cli("run", manifest, "--output", tmp_path / "out", "--nproc", nproc)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "train.log").exists()  # refused before any process started


def test_cli_rejects_unreadable_tokenizer_and_bad_yaml(prepared: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json")
    manifest = write_manifest(tmp_path / "job.yaml",
                              job_manifest(spec=training_spec(prepared), tokenizer={"path": str(garbage)}))
    result = run_cli("run", manifest, "--output", tmp_path / "out")
    assert result.returncode == 2 and "tokenizer.path: cannot read" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    result = run_cli("run", bad)
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    result = run_cli("run", tmp_path / "missing.yaml")
    assert result.returncode == 2 and "cannot read the manifest" in result.stderr


def test_cli_exits_retryable_when_checkpoint_storage_is_down_at_start(prepared: Path, tmp_path: Path) -> None:
    """An S3 endpoint that refuses connections is no configuration error: exit 5 (the operator restarts the
    job), one line naming checkpoint.uri, no traceback, no training process."""
    s3 = {"endpoint": f"http://127.0.0.1:{free_port()}", "maxAttempts": 2, "timeoutSeconds": 2}
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        spec=training_spec(prepared), checkpoint={"uri": "s3://bucket/job/"}, s3=s3))
    result = run_cli("run", manifest, "--output", tmp_path / "out", "--nproc", 1,
                     env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert result.returncode == EXIT_STORAGE_UNAVAILABLE, result.stdout + result.stderr
    last = result.stderr.splitlines()[-1]  # after the retries' warnings
    assert last.startswith("error: checkpoint.uri: cannot list s3://bucket/job/ (EndpointConnectionError")
    assert last.endswith("storage is unavailable for now; retrying later may succeed (the operator restarts the job)")
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "train.log").exists()
