"""The exported model: a Hugging Face directory (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads as it is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import full_state_dict


def export_hf(model: torch.nn.Module, mcfg: Any, tokenizer: Any, out: Path, dtype: torch.dtype, rank: int) -> None:
    """Collective: gather full weights to rank 0 and write a Hugging Face model directory (safetensors)."""
    from transformers import LlamaForCausalLM

    weights = full_state_dict(model)
    if rank != 0:
        return
    with torch.device("meta"):
        hf = LlamaForCausalLM(mcfg)
    hf.load_state_dict(weights, assign=True)
    hf = hf.to(dtype=dtype)  # type: ignore[call-arg]
    hf.config.torch_dtype = dtype
    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: never a half-written model/
    hf.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
