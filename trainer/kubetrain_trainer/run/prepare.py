"""`kubetrain run`'s inputs: raw text turned into a trained tokenizer and prepared shards under the
run's output (cached: a rerun with unchanged inputs and settings reuses them), or prepared inputs
taken as they are. Raw text under s3:// (a glob, a file, or any prefix with tokenizer.train) goes through
the cluster's preparation stage (prepare_stage.py) into the output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kubetrain_api.config import TrainerConfig
from kubetrain_api.preparation import needs_preparation, prepared_config, prepared_location

from .. import preparation as datamod
from ..errors import ConfigError


def prepare_inputs(cfg: TrainerConfig, workdir: Path, log: Any = print) -> TrainerConfig:
    """Return a copy of `cfg` whose data are prepared shard dirs and whose tokenizer is a saved one,
    preparing (and training a tokenizer) under `workdir` when the inputs are raw text. Cached: a rerun
    with unchanged inputs and settings reuses the earlier output."""
    from ..tokenizer import load_tokenizer

    d = cfg.data
    if d.train.startswith("s3://") and needs_preparation(cfg):
        # Raw text in a bucket: the cluster's preparation stage (the same preparation code), into the output.
        from ..prepare_stage import run_stage

        location = prepared_location(str(workdir / "prepared"), cfg)
        run_stage(cfg, location, "all", scratch=workdir, log=log)
        return prepared_config(cfg, location)
    if d.train.startswith("s3://") or datamod.is_prepared(d.train):
        return _given_prepared(cfg, workdir)
    train_files = datamod.resolve_inputs(d.train, "data.train")
    val_files = datamod.resolve_inputs(d.validation, "data.validation") if d.validation else None
    split = None if val_files else d.effective_validation_split
    tok_path = _tokenizer(cfg, train_files, split, workdir, log)
    out = _shards(cfg, load_tokenizer(tok_path), train_files, val_files, split, workdir / "data", log)
    data = d.model_copy(update={"train": str(out / "train"), "validation": str(out / "validation"),
                                "validation_split": None})
    return cfg.model_copy(update={"data": data,
                                  "tokenizer": cfg.tokenizer.model_copy(update={"path": tok_path, "train": None})})


def _given_prepared(cfg: TrainerConfig, workdir: Path) -> TrainerConfig:
    """Prepared shards as given; the tokenizer defaults to the one `kubetrain prepare` wrote beside them."""
    from ..tokenizer import load_tokenizer

    d = cfg.data
    if d.validation is None or not (d.validation.startswith("s3://") or datamod.is_prepared(d.validation)):
        raise ConfigError("data.validation: with prepared training shards, give the prepared validation "
                          "shards too (the validation/ directory `kubetrain prepare` wrote)")
    tok_path = cfg.tokenizer.path or d.train.rstrip("/").rsplit("/", 1)[0] + "/tokenizer"
    if tok_path.startswith("s3://"):
        from ..storage import local_copy

        tok_path = local_copy(tok_path, workdir / "tokenizer-download", cfg.s3, "tokenizer.path")
    load_tokenizer(tok_path)
    return cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": tok_path})})


def _tokenizer(cfg: TrainerConfig, train_files: list[Path], split: float | None, workdir: Path, log: Any) -> str:
    """The tokenizer's path: tokenizer.path (or initFrom's), or a BPE trained on the training files,
    retrained only when they or tokenizer.train change."""
    from ..tokenizer import train_bpe

    t, d = cfg.tokenizer.train, cfg.data
    if t is None:
        return cfg.tokenizer.path or str(cfg.model.init_from)
    key = datamod.inputs_fingerprint(train_files, vocab=t.vocab_size, min_freq=t.min_frequency,
                                     sample=t.sample_chars, split=split, field=d.text_field)
    tok_dir = workdir / "tokenizer"
    stamp = tok_dir / "kubetrain-inputs.txt"
    if not (stamp.is_file() and stamp.read_text() == key):
        log(f"training a {t.vocab_size}-token byte-level BPE on {len(train_files)} file(s) ...")
        tok = train_bpe(datamod.iter_training_texts(train_files, d.text_field, split, t.sample_chars),
                        t.vocab_size, t.min_frequency)
        tok.save_pretrained(str(tok_dir))
        stamp.write_text(key)
    return str(tok_dir)


def _shards(cfg: TrainerConfig, tokenizer: Any, train_files: list[Path], val_files: list[Path] | None,
            split: float | None, out: Path, log: Any) -> Path:
    """Prepared shards in `out`, prepared again only when the files, the tokenizer or the settings change."""
    from ..tokenizer import tokenizer_fingerprint

    d = cfg.data
    key = datamod.inputs_fingerprint(train_files + (val_files or []), tokenizer=tokenizer_fingerprint(tokenizer),
                                     split=split, field=d.text_field, min_chars=d.min_document_chars,
                                     version=datamod.FORMAT_VERSION)
    info = out / "prepare.json"
    if info.is_file() and json.loads(info.read_text()).get("inputs") == key:
        return out
    log(f"preparing {len(train_files)} training file(s) → {out} ...")
    t0 = time.perf_counter()
    stats = datamod.prepare(train_files, tokenizer, out, validation_files=val_files,
                            validation_split=split or 0.0, text_field=d.text_field,
                            min_document_chars=d.min_document_chars, extra_meta={"inputs": key})
    dt = time.perf_counter() - t0
    total = sum(stats.tokens.values())
    log(f"prepared {stats.documents['train']} train / {stats.documents['validation']} validation documents, "
        f"{stats.tokens['train']:,} / {stats.tokens['validation']:,} tokens ({total / dt:,.0f} tokens/s); "
        f"dropped {stats.documents_dropped_small} tiny and {stats.documents_duplicate} duplicate documents")
    return out
