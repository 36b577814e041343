"""The prepared inputs a run trains on (tokenizer, training and validation shards), opened and checked
in one place: by `kubetrain run`'s preflight, before any process starts, and by every trainer process,
because a cluster pod has no preflight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain_api.config import TrainerConfig

from .errors import ConfigError
from .shards import TokenShards
from .storage import local_copy
from .tokenizer import load_tokenizer, tokenizer_fingerprint


@dataclass
class Inputs:
    tokenizer: Any
    tokenizer_fingerprint: str
    train: TokenShards
    validation: TokenShards


def open_inputs(cfg: TrainerConfig, world_size: int, workdir: Path) -> Inputs:
    """Open the inputs for `world_size` processes, or raise the ConfigError naming the field and the fix.
    A tokenizer under s3:// is downloaded into `workdir` first."""
    ts = cfg.training
    if (problem := ts.batch_layout_error(world_size)) is not None:
        raise ConfigError(problem)
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: the trainer needs a prepared tokenizer; run it through `kubetrain run`")
    tokenizer = load_tokenizer(local_copy(cfg.tokenizer.path, workdir / "tokenizer-download", cfg.s3,
                                          "tokenizer.path"))
    train = TokenShards(cfg.data.train, cfg.data.seq_length, "data.train", s3=cfg.s3)
    if cfg.data.validation is None:
        raise ConfigError("data.validation: the trainer needs prepared validation shards")
    validation = TokenShards(cfg.data.validation, cfg.data.seq_length, "data.validation", s3=cfg.s3)
    fingerprint = tokenizer_fingerprint(tokenizer)
    for name, shards in (("data.train", train), ("data.validation", validation)):
        if shards.tokenizer_fingerprint != fingerprint:
            raise ConfigError(f"{name}: shards in {shards.root} were tokenised with another tokenizer "
                              f"({shards.tokenizer_fingerprint} != {fingerprint}); prepare them again")
    if len(train) < ts.global_batch_size:
        raise ConfigError(f"data.train holds {len(train)} sequences of {cfg.data.seq_length} tokens, fewer "
                          f"than training.globalBatchSize ({ts.global_batch_size}); add data or lower either")
    if len(validation) == 0:
        raise ConfigError(f"data.validation holds no full sequence of {cfg.data.seq_length} tokens; raise "
                          f"data.validationSplit or give more validation data")
    return Inputs(tokenizer, fingerprint, train, validation)
