"""`kubetrain run`'s supervision of torchrun: start it with the trainer config, forward Ctrl-C and
SIGTERM so that the trainer checkpoints before it exits, and follow rank 0's events.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubetrain_api.config import TrainerConfig
from kubetrain_api.contract import EVENTS_FILE, EventKind, trainer_argv

from ..preemption import die_with_parent
from .progress_bar import Progress


def launch(cfg: TrainerConfig, output: Path, nproc: int, progress: Progress) -> tuple[int, int]:
    """Run torchrun with `nproc` processes and follow rank 0's events until it exits.
    Returns the exit code and the events file offset this run's events start at."""
    config_path = output / "trainer-config.json"
    config_path.write_text(json.dumps(cfg.to_wire(), indent=1))
    events_path = output / EVENTS_FILE
    offset = start = events_path.stat().st_size if events_path.exists() else 0
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # split the cores between the processes instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", f"--shutdown-timeout={int(cfg.checkpoint.preemption_grace_seconds) + 10}",
           *trainer_argv(str(config_path), str(output))]
    with (output / "train.log").open("ab") as log:
        # SIGTERM if this process dies (even by SIGKILL): torchrun then stops its workers as on Ctrl-C.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM, os.getpid()))

    def forward(signum: int, frame: Any) -> None:  # Ctrl-C or SIGTERM: let the trainer checkpoint first
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            offset = _follow(events_path, offset, progress)
            if proc.poll() is not None:
                _follow(events_path, offset, progress)
                return proc.returncode, start
            time.sleep(0.2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _follow(path: Path, offset: int, progress: Progress) -> int:
    if not path.exists():
        return offset
    with path.open() as fh:
        fh.seek(offset)
        while True:
            line = fh.readline()
            if not line.endswith("\n"):
                break
            progress.update(json.loads(line))
            offset = fh.tell()
    return offset


def last_event(path: Path, kind: EventKind, since: int = 0) -> dict[str, Any] | None:
    if not path.exists():
        return None
    found = None
    with path.open() as fh:
        fh.seek(since)
        lines = fh.read().splitlines()
    for line in lines:
        ev = json.loads(line)
        if ev.get("type") == kind:
            found = ev
    return found
