"""Real trainer processes from the tests: the `kubetrain` CLI and torchrun as subprocesses, their events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetrain_api.contract import EVENTS_FILE, trainer_argv

KUBETRAIN = [sys.executable, "-m", "kubetrain_cli"]


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KUBETRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_events(output: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = output / EVENTS_FILE
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [e for e in events if kind is None or e["type"] == kind]


def step_losses(output: Path) -> dict[int, float]:
    """Step → training loss; a step logged again after a resume keeps its newest value."""
    return {e["step"]: e["loss"] for e in read_events(output, "step")}


def torchrun_cmd(nproc: int, config: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", *trainer_argv(str(config), str(output))]


def kill9_tree(pid: int) -> None:
    """kill -9 a process and all its descendants at once, like a lost node (torchrun's workers run in
    sessions of their own, so killing its process group would miss them)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


def trainer_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}
