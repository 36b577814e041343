"""What every kind of test shares: a free port, deep merge, waiting (sync and async), stopping a server
process, and the one builder of LLMTrainingJob manifests. Tests import it as `support` (pytest puts tests/
on sys.path); nothing imports conftest. The servers and players live beside it: support.s3 (moto),
support.chart (helm), support.operator (the played node and kubelet, the in-memory cluster for the
planner), support.runs (the CLI and torchrun as subprocesses); the test bed is tests/cluster/.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

# A Llama small enough that a step takes milliseconds on one CPU thread.
TEST_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 128}

# A small valid spec whose paths are never read: the planner, render and the operator against a played
# kubelet only look at its shape.
PLACEHOLDER_SPEC: dict[str, Any] = {
    "image": "kubetrain/trainer:test",
    "model": {"preset": "tiny"},
    "tokenizer": {"path": "/data/tokenizer"},
    "data": {"train": "/data/train", "validation": "/data/validation", "seqLength": 64},
    "training": {"maxSteps": 100, "globalBatchSize": 16, "microBatchSize": 2},
    "checkpoint": {"uri": "/checkpoints/job"},
    "workers": {"nodes": 2, "procPerNode": 1},
    "runPolicy": {"maxRestarts": 3, "restartBackoffSeconds": 10},
}


def training_spec(prepared: Path) -> dict[str, Any]:
    """A spec that really trains: TEST_MODEL over `prepared` (`kubetrain prepare` output) for 12 steps, with
    an eval and a checkpoint every 6, on one process per node."""
    return {
        "model": {"preset": "tiny", "config": dict(TEST_MODEL)},
        "tokenizer": {"path": str(prepared / "tokenizer")},
        "data": {"train": str(prepared / "train"), "validation": str(prepared / "validation"), "seqLength": 64},
        "training": {"maxSteps": 12, "globalBatchSize": 8, "microBatchSize": 4, "precision": "fp32",
                     "optimizer": {"lr": 0.003}, "schedule": {"warmupSteps": 2}, "evalEvery": 6, "evalBatches": 2,
                     "seed": 7},
        "checkpoint": {"everySteps": 6, "keep": 2, "exportHF": False},
        "workers": {"procPerNode": 1},
        "metrics": {"port": 0},
    }


def job_manifest(name: str = "test-job", namespace: str | None = None, *, spec: dict[str, Any] | None = None,
                 **sections: Any) -> dict[str, Any]:
    """An LLMTrainingJob: `spec` (default PLACEHOLDER_SPEC; training_spec(prepared) to train) with the
    keyword sections deep-merged in (`training={"maxSteps": 4}` changes that one field)."""
    body = deep_merge(copy.deepcopy(PLACEHOLDER_SPEC if spec is None else spec), copy.deepcopy(sections))
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob", "metadata": metadata, "spec": body}


def spec_dict(**sections: Any) -> dict[str, Any]:
    """PLACEHOLDER_SPEC with `sections` deep-merged in: job_manifest(...)["spec"]."""
    return job_manifest(**sections)["spec"]


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into `base` in place (mappings merge key by key, anything else replaces); returns base."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(condition: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    """Poll `condition` every 20 ms until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def wait_until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """wait_for in a coroutine; `condition` may be sync or async."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
