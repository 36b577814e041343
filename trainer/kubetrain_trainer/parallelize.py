"""Execution layout: FSDP2 per decoder block or DDP, activation checkpointing, torch.compile, precision.

None of this changes the math of a step: the same global batch and the same mean loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kubetrain_api.config import TrainingSpec
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class Layout:
    parallelism: str  # "fsdp", "ddp" or "single"
    dtype: torch.dtype  # compute dtype
    autocast: Callable[[], contextlib.AbstractContextManager]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False  # CPU bf16 matmuls are emulated (slow) on most CPUs: train in fp32 there


def choose_parallelism(spec: TrainingSpec, world_size: int, parameters: int, device: torch.device) -> str:
    """auto: DDP while model + gradients + AdamW state (16 B/param) fit in a quarter of one device's
    memory (DDP then beats FSDP: no per-block all-gathers); FSDP2 above that."""
    if world_size == 1:
        return "single"
    if spec.parallelism != "auto":
        return spec.parallelism
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        return "ddp" if 16 * parameters < memory / 4 else "fsdp"
    return "ddp"


def parallelize(model: LlamaForCausalLM, spec: TrainingSpec, parallelism: str, device: torch.device
                ) -> tuple[torch.nn.Module, Layout]:
    """Returns the module to call for forward/backward (maybe a DDP wrapper) and the layout chosen."""
    use_bf16 = spec.precision == "bf16" and bf16_supported(device)
    if spec.precision == "bf16" and not use_bf16:
        log.warning("precision bf16 requested, but %s has no fast bf16: training in fp32", device.type)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    model.config.use_cache = False  # a KV cache only serves generation
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.compiles:
        for block in model.model.layers:
            block.compile()
    no_autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if parallelism == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model, Layout("fsdp", dtype, no_autocast)  # FSDP2 casts parameters itself

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16)

    autocast = amp if use_bf16 else no_autocast
    if parallelism == "ddp":
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp, Layout("ddp", dtype, autocast)
    return model, Layout("single", dtype, autocast)


def no_sync(module: torch.nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        return module.no_sync()
    return contextlib.nullcontext()
