"""The exported model: a Hugging Face directory (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads as it is, and its publication beside the checkpoints."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .storage import Store, put_tree

EXPORT_MARKER = "COMPLETE"  # written last: the export under its prefix is whole, and only its files are there


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """Collective: the unsharded model weights on CPU, on rank 0 only (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


def publish_export(store: Store, local: Path, prefix: str) -> str:
    """Upload the exported directory `local` under `prefix` of `store`, so that what is there is never taken
    for a whole export when it is not: the previous export's marker goes first, then everything else under
    the prefix (an older export's files, which a new one with other shard names would not overwrite, and a
    killed upload's), then the files, and the marker (each file and its size) last. The prefix stays the
    model's one address (`<checkpoint.uri>/hf/`); while an export is published it has no marker. Returns
    the prefix's URI."""
    store.delete_prefix(prefix + EXPORT_MARKER)
    store.abort_uploads(prefix)
    store.delete_prefix(prefix)
    put_tree(store, local, prefix)
    files = {str(p.relative_to(local)): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
    store.put(prefix + EXPORT_MARKER, json.dumps({"files": files, "time": time.time()}, indent=1).encode())
    return store.child_uri(prefix)
