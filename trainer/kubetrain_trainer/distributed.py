"""The process group: one per training process, as torchrun starts them (or a world of one)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs); returns rank, world size, local rank
    and this process's device."""
    if "RANK" not in os.environ:  # a plain `python -m` run: a world of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local, device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Collective: the element-wise sums over all ranks, in float64 (one all-reduce for several values)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
