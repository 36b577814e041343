"""`kubetrain run`'s preflight: every check that needs the prepared inputs but no training process, so
that a wrong input exits 2 before torchrun starts (and writes no train.log).
"""

from __future__ import annotations

from pathlib import Path

from kubetrain_api.config import TrainerConfig

from ..checkpoint import CheckpointManager, checkpoint_uri
from ..inputs import open_inputs
from ..model import llama_config, model_fingerprint
from ..storage import open_store, start_error


def preflight(cfg: TrainerConfig, nproc: int, output: Path) -> None:
    """The trainer's input checks (inputs.py), the model overrides, and a readable, compatible checkpoint."""
    inputs = open_inputs(cfg, nproc, output)
    mcfg = llama_config(cfg.model, len(inputs.tokenizer), cfg.data.seq_length)
    store = open_store(checkpoint_uri(cfg, output), cfg.s3)
    manager = CheckpointManager(store, cfg.checkpoint.keep, -1,
                                {"model": model_fingerprint(mcfg), "tokenizer": inputs.tokenizer_fingerprint})
    try:
        latest = manager.latest()
    except Exception as exc:  # storage errors name the operation, never the credentials
        raise start_error(f"checkpoint.uri: cannot list {store.uri}", exc,
                          "check the bucket, s3.endpoint and the credentials") from exc
    if latest is not None:
        manager.check_compatible(latest)
