"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically, kept to the newest `keep`.

A checkpoint is the directory `step-NNNNNNNNN/`. Every rank writes its shards with DCP; then rank 0
writes `trainer_state.json` and finally `COMMITTED` (written to a temporary name, fsynced, renamed).
Only directories with `COMMITTED` are ever loaded, and their listed files are checked first, so a
crash or kill -9 mid-save leaves the previous committed checkpoint as the one that resumes.
DCP stores tensors by fully-qualified name and global shape, so a checkpoint saved by N processes
loads into M (resharding) and into FSDP2 or DDP alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import ConfigError

MARKER = "COMMITTED"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int, rank: int, fingerprints: dict[str, str]):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.fingerprints = fingerprints
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # -- discovery ---------------------------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / MARKER).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        for step in reversed(self.committed_steps()):
            if self._intact(step):
                return step
        return None

    def _intact(self, step: int) -> bool:
        """All files the marker lists exist with their recorded sizes (a damaged one is skipped)."""
        d = self.root / step_dir_name(step)
        try:
            marker = json.loads((d / MARKER).read_text())
            return all((d / f).stat().st_size == size for f, size in marker["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> float:
        """Collective: every rank calls it. Returns the seconds it took."""
        t0 = time.perf_counter()
        d = self.root / step_dir_name(step)
        if self.rank == 0 and d.exists():
            shutil.rmtree(d)  # never committed (or we would not save this step again): debris of a crash
        dist.barrier()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(d))  # returns after every rank wrote and .metadata is written
        if self.rank == 0:
            write_atomic(d / STATE, json.dumps(trainer_state))
            files = {str(f.relative_to(d)): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file()}
            marker = {"step": step, "worldSize": dist.get_world_size(), "time": time.time(),
                      "files": files, **self.fingerprints}
            write_atomic(d / MARKER, json.dumps(marker, indent=1))
            self._retain()
        dist.barrier()
        return time.perf_counter() - t0

    def _retain(self) -> None:
        """Delete committed checkpoints beyond the newest `keep`, and uncommitted debris older than the
        newest commit. Runs only right after a commit, so a committed checkpoint always remains."""
        committed = self.committed_steps()
        newest = committed[-1]
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if not m:
                continue
            step = int(m.group(1))
            if (step in committed and step not in committed[-self.keep :]) or (
                    step not in committed and step < newest):
                shutil.rmtree(d, ignore_errors=True)

    # -- load ----------------------------------------------------------------------------------------
    def check_compatible(self, step: int) -> dict[str, Any]:
        marker = json.loads((self.root / step_dir_name(step) / MARKER).read_text())
        for key, expected in self.fingerprints.items():
            if marker.get(key) != expected:
                what = "model architecture" if key == "model" else key
                raise ConfigError(
                    f"checkpoint.uri: {self.root / step_dir_name(step)} was written with a different {what} "
                    f"({marker.get(key)} != {expected}); restore the original model/tokenizer settings, or set a "
                    f"new checkpoint.uri to start afresh")
        return marker

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective: loads model and optimizer shards in place (any world size) and returns the
        trainer state (step, histories)."""
        self.check_compatible(step)
        d = self.root / step_dir_name(step)
        state: dict[str, Any] = {"model": get_model_state_dict(model),
                                 "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(d))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        return json.loads((d / STATE).read_text())


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """Collective: the unsharded model weights on CPU, on rank 0 only (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
