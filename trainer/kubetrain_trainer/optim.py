"""AdamW and the learning-rate schedule (a pure function of the step, so it needs no saved state)."""

from __future__ import annotations

import math

import torch
from kubetrain_api.config import TrainingSpec


def lr_at(step: int, spec: TrainingSpec) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to minLrRatio·lr."""
    peak, sched = spec.optimizer.lr, spec.schedule
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    if sched.decay == "constant":
        return peak
    progress = (step - sched.warmup_steps) / max(1, spec.max_steps - sched.warmup_steps)
    floor = peak * sched.min_lr_ratio
    if sched.decay == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, spec: TrainingSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases); fused on GPUs, foreach elsewhere."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    opt = spec.optimizer
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr_at(0, spec), betas=opt.betas, eps=opt.eps,
                             fused=fused or None, foreach=None if fused else True)
