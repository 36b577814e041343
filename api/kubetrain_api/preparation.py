"""Data preparation on a cluster: what the operator and the trainer's preparation stage agree on.

A job whose training data is raw text, or whose tokenizer is to be trained, is prepared before its workers
start, by `python -m kubetrain_trainer.prepare_stage` (the same code as `kubetrain run`'s preparation). The
stage writes, under one location:

    <location>/tokenizer/            the tokenizer (trained once, before the fan-out)
    <location>/TOKENIZER.json        written after the tokenizer: its inputs' fingerprint
    <location>/train/index.json      one index over every part's shards (train/part-NNNNN/shard-NNNNN.bin)
    <location>/validation/index.json
    <location>/parts/part-NNNNN.json one per finished part (its shards, token counts, the fingerprint)
    <location>/PREPARED.json         the marker, written last, after the whole output was listed and checked

The location is `<base>/<settings fingerprint>/`: a hash of the data and tokenizer settings, so the operator
can name it (and point the workers' config at it) before any pod runs. The inputs' *content* (S3 ETags and
sizes, local sizes and modification times) is fingerprinted by the stage and recorded in the marker: a rerun
whose inputs and settings are unchanged finds the marker and exits at once; changed inputs are prepared again.

Standard library and pydantic only (both sides import it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from .config import TrainerConfig

STAGE_MODULE = "kubetrain_trainer.prepare_stage"
FORMAT = 1  # bump when the stage's output layout changes: the location changes with it

MARKER = "PREPARED.json"
TOKENIZER_MARKER = "TOKENIZER.json"
TOKENIZER_DIR = "tokenizer"
PARTS_DIR = "parts"
SIDES = ("train", "validation")
RAW_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

Step = Literal["all", "tokenizer", "part", "merge"]
STEPS: tuple[Step, ...] = ("all", "tokenizer", "part", "merge")


def is_raw_text(path: str | None) -> bool:
    """Whether a data path names raw text by its form alone (the operator cannot look inside a volume or a
    bucket): `corpus://…`, a glob, or a file with a text suffix. A plain directory or prefix is taken as
    prepared shards, unless the tokenizer is to be trained (see needs_preparation)."""
    if path is None:
        return False
    if path.startswith("corpus://"):
        return True
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return any(c in path for c in "*?[") or last.endswith(RAW_SUFFIXES)


def needs_preparation(cfg: TrainerConfig) -> bool:
    """Raw text to clean, de-duplicate, tokenise and shard, or a tokenizer to learn: the workers need the
    stage's output first. A tokenizer can only be trained on text, so tokenizer.train means the data are raw."""
    d = cfg.data
    return cfg.tokenizer.train is not None or is_raw_text(d.train) or is_raw_text(d.validation)


def settings_fingerprint(cfg: TrainerConfig) -> str:
    """What the prepared output depends on besides the inputs' content: the data paths, the hold-out, the
    document rules and the tokenizer settings. Not seqLength: one prepared directory serves any length."""
    d = cfg.data
    settings = {
        "format": FORMAT,
        "train": d.train, "validation": d.validation,
        "validationSplit": None if d.validation else d.effective_validation_split,
        "textField": d.text_field, "minDocumentChars": d.min_document_chars,
        "tokenizer": cfg.tokenizer.to_wire(),
        "initFrom": cfg.model.init_from if cfg.tokenizer.path is None and cfg.tokenizer.train is None else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepared_location(base: str, cfg: TrainerConfig) -> str:
    """`<base>/<settings fingerprint>/`; `base` is an s3:// prefix or a directory (always ends with /)."""
    return f"{base.rstrip('/')}/{settings_fingerprint(cfg)}/"


def prepared_config(cfg: TrainerConfig, location: str) -> TrainerConfig:
    """The config the workers train with: the stage's shards and tokenizer in place of the raw inputs."""
    loc = location.rstrip("/") + "/"
    data = cfg.data.model_copy(update={"train": f"{loc}train/", "validation": f"{loc}validation/",
                                       "validation_split": None})
    tokenizer = cfg.tokenizer.model_copy(update={"path": f"{loc}{TOKENIZER_DIR}/", "train": None})
    return cfg.model_copy(update={"data": data, "tokenizer": tokenizer})


def part_key(part: int) -> str:
    return f"{PARTS_DIR}/part-{part:05d}.json"


def stage_argv(config: str, location: str, step: Step = "all", parts: int = 1,
               workdir: str | None = None) -> list[str]:
    """The stage's command line. `part` steps take their index from $JOB_COMPLETION_INDEX (an Indexed Job)."""
    argv = ["python", "-m", STAGE_MODULE, "--config", config, "--to", location, "--step", step]
    if step in ("part", "merge"):
        argv += ["--parts", str(parts)]
    if workdir is not None:
        argv += ["--workdir", workdir]
    return argv
