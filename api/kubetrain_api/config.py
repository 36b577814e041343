"""The trainer's configuration: the training-side sections of an LLMTrainingJob manifest.

This module imports only pydantic so that the operator (which has no torch) can embed it in the
CRD spec. Field names are snake_case in Python and camelCase in YAML/JSON (the manifest form).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

Preset = Literal["tiny", "llama-125m", "llama-1b", "llama-7b", "llama-13b"]


class Section(BaseModel):
    """Base of every manifest section: camelCase on the wire, unknown fields rejected (typos fail loudly)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSpec(Section):
    preset: Preset = Field("tiny", description="Architecture preset; llama-7b is the Llama-2-7B shape.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of transformers.LlamaConfig fields (snake_case, e.g. num_hidden_layers: 8).",
    )
    init_from: str | None = Field(
        None, description="Initial weights: a Hugging Face model directory (fine-tuning). Empty: random init."
    )


class TokenizerTraining(Section):
    vocab_size: int = Field(8000, ge=256, le=262_144, description="Vocabulary size of the byte-level BPE.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    sample_chars: int = Field(
        500_000_000, gt=0, description="Train on at most this many characters of the training data."
    )


class TokenizerSpec(Section):
    path: str | None = Field(
        None, description="A Hugging Face tokenizer directory, a tokenizer.json, or a SentencePiece .model."
    )
    train: TokenizerTraining | None = Field(
        None, description="Train a byte-level BPE on the training data instead of loading one."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if self.path is not None and self.train is not None:
            raise ValueError("set either tokenizer.path or tokenizer.train, not both")
        return self


class DataSpec(Section):
    train: str = Field(
        description="Training data: a path or glob of .txt/.jsonl/.parquet files, a prepared shard "
        "directory, or corpus://shakespeare (the demo corpus, fetched on first use)."
    )
    validation: str | None = Field(None, description="Validation data, same forms as train.")
    validation_split: float | None = Field(
        None, gt=0.0, lt=0.5, description="Fraction of training documents held out when validation is unset."
    )
    text_field: str = Field("text", min_length=1, description="Field holding the text in .jsonl/.parquet.")
    seq_length: int = Field(2048, ge=8, le=1_048_576, description="Tokens per training sequence.")
    min_document_chars: int = Field(
        32, ge=0, description="Documents shorter than this after clean-up are dropped."
    )

    @model_validator(mode="after")
    def _validation_source(self) -> DataSpec:
        if self.validation is not None and self.validation_split is not None:
            raise ValueError("set either data.validation or data.validationSplit, not both")
        return self

    @property
    def effective_validation_split(self) -> float:
        return self.validation_split if self.validation_split is not None else 0.01


class OptimizerSpec(Section):
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay (matrices only).")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerSpec:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("training.optimizer.betas must both lie in [0, 1), e.g. [0.9, 0.95]")
        return self


# Where `training.compile` unset turns compiling on. A cold compile of the tiny preset on 2 CPU threads cost
# 6 s of first step in the benchmark (up to ~25 s on a machine's very first compile), against ~9% of a ~1 s
# step saved (docs/benchmarks.md §1): it pays for itself after ~70-300 steps. On a GPU the saving per step is
# larger and so is a run; 1000 keeps tests and short experiments uncompiled.
AUTO_COMPILE_MIN_STEPS = 1000


class ScheduleSpec(Section):
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr as a fraction of the peak.")


class TrainingSpec(Section):
    max_steps: int = Field(1000, gt=0, description="Optimizer steps to train.")
    global_batch_size: int = Field(
        256, gt=0, description="Sequences per optimizer step over all processes (the math, not the layout)."
    )
    micro_batch_size: int = Field(
        8, gt=0, description="Sequences per forward pass per process; gradients accumulate to the global batch."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this; 0 disables.")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16 mixed precision where the device supports it, else fp32."
    )
    parallelism: Literal["auto", "fsdp", "ddp"] = Field(
        "auto", description="auto: DDP when the model fits each device comfortably, FSDP2 otherwise."
    )
    activation_checkpointing: bool = Field(False, description="Recompute decoder blocks in backward.")
    compile: bool | None = Field(
        None, description=f"torch.compile each decoder block. Unset: on for runs of at least "
        f"{AUTO_COMPILE_MIN_STEPS} steps (compiling then costs a small share of the run), off for shorter ones.")
    eval_every: int = Field(100, ge=0, description="Evaluate every N steps (and always at the end); 0: end only.")
    eval_batches: int = Field(10, gt=0, description="Validation batches (of globalBatchSize sequences).")
    seed: int = Field(1234, ge=0, description="Seed for initialisation and data order.")

    @property
    def compiles(self) -> bool:
        """Whether the decoder blocks are compiled: `compile` if set, else by the run's length."""
        return self.compile if self.compile is not None else self.max_steps >= AUTO_COMPILE_MIN_STEPS

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingSpec:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"training.microBatchSize ({self.micro_batch_size}) must divide training.globalBatchSize "
                f"({self.global_batch_size}); pick a divisor such as "
                f"{_largest_divisor_at_most(self.global_batch_size, self.micro_batch_size)}"
            )
        if self.schedule.warmup_steps >= self.max_steps:
            raise ValueError(
                f"training.schedule.warmupSteps ({self.schedule.warmup_steps}) must be below "
                f"training.maxSteps ({self.max_steps})"
            )
        return self

    def batch_layout_error(self, world_size: int) -> str | None:
        """Why this batch cannot be split over `world_size` processes, or None when it can."""
        per_rank, rest = divmod(self.global_batch_size, world_size)
        if rest or per_rank == 0:
            return (
                f"training.globalBatchSize ({self.global_batch_size}) must be a multiple of the number of "
                f"processes ({world_size}); use {max(world_size, self.global_batch_size // world_size * world_size)}"
            )
        if per_rank % self.micro_batch_size:
            return (
                f"training.microBatchSize ({self.micro_batch_size}) must divide the per-process batch "
                f"({self.global_batch_size} / {world_size} processes = {per_rank}); use "
                f"{_largest_divisor_at_most(per_rank, self.micro_batch_size)}"
            )
        return None


class S3Spec(Section):
    """Where s3:// URIs (data, checkpoints, export) live. Credentials are never part of the manifest:
    on clusters they come from `credentialsSecret`, locally from the usual boto3 chain."""

    endpoint: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, Ceph...); empty: AWS.")
    region: str | None = Field(None, description="Region, e.g. us-east-1.")
    credentials_secret: str | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (clusters).")
    addressing_style: Literal["auto", "virtual", "path"] = Field("auto", description="Bucket addressing style.")
    part_size_bytes: int = Field(32 * 2**20, ge=5 * 2**20, le=5 * 2**30, description="Multipart part size.")
    object_size_bytes: int = Field(
        2**30, ge=5 * 2**20, description="Checkpoint files are split into objects of at most this size.")
    max_concurrency: int = Field(8, ge=1, le=256, description="Parallel part uploads / ranged reads per process.")
    max_attempts: int = Field(6, ge=1, le=50, description="Attempts per request (exponential backoff, jitter).")
    timeout_seconds: float = Field(60.0, gt=0, description="Connect and read timeout per request.")

    @model_validator(mode="after")
    def _parts_fit(self) -> S3Spec:
        if self.object_size_bytes % self.part_size_bytes:
            raise ValueError(f"s3.objectSizeBytes ({self.object_size_bytes}) must be a multiple of "
                             f"s3.partSizeBytes ({self.part_size_bytes})")
        return self


class CheckpointSpec(Section):
    uri: str | None = Field(
        None, description="Where checkpoints go: s3://bucket/prefix/, a local path or file:// URI. "
        "Default: <output>/checkpoints.")
    every_steps: int = Field(500, ge=0, description="Save every N steps (and at the end); 0: end only.")
    keep: int = Field(3, ge=1, description="Committed checkpoints to keep; older ones are deleted.")
    export_hf: bool = Field(True, alias="exportHF", description="Write a Hugging Face model directory at the end.")
    async_save: bool = Field(
        True, description="Training resumes once state is copied to host memory; the write runs behind it.")
    preemption_grace_seconds: float = Field(
        25.0, gt=0, le=3600, description="On SIGTERM, commit a checkpoint within this long or leave the previous "
        "one (torchrun is given a longer shutdown timeout; pods a longer termination grace period).")
    max_consecutive_failures: int = Field(
        3, ge=1, description="Failed saves in a row that stop the job (single failures are reported, not fatal).")

    @model_validator(mode="after")
    def _known_scheme(self) -> CheckpointSpec:
        if self.uri is not None and "://" in self.uri and not self.uri.startswith(("file://", "s3://")):
            scheme = self.uri.split("://", 1)[0]
            raise ValueError(f"checkpoint.uri scheme {scheme}:// is not supported; use s3://, file:// or a path")
        if self.uri is not None and self.uri.startswith("s3://") and len(self.uri.rstrip("/")) <= len("s3://"):
            raise ValueError("checkpoint.uri: s3:// needs a bucket, e.g. s3://my-bucket/jobs/llama/")
        if self.uri is not None and self.uri.startswith("s3://") and not self.uri[5:].strip("/").count("/"):
            # A job cleans up (aborts uploads, deletes debris) under its prefix: a whole bucket is not its own.
            raise ValueError(f"checkpoint.uri: {self.uri} names a whole bucket; give the job a prefix of its own, "
                             f"e.g. {self.uri.rstrip('/')}/jobs/<name>/")
        return self

    @property
    def is_s3(self) -> bool:
        return self.uri is not None and self.uri.startswith("s3://")

    @property
    def local_path(self) -> str | None:
        if self.uri is None or self.is_s3:
            return None
        return self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri


class MetricsSpec(Section):
    port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics and /progress port; 0 picks a free one.")
    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s per device for MFU; default: a table per accelerator, or measured on CPU."
    )


class TrainerConfig(Section):
    """Everything the trainer needs; the operator embeds these sections in the LLMTrainingJob spec."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    s3: S3Spec = Field(default_factory=S3Spec)

    @model_validator(mode="after")
    def _tokenizer_source(self) -> TrainerConfig:
        if self.tokenizer.path is None and self.tokenizer.train is None and self.model.init_from is None:
            raise ValueError(
                "tokenizer: set tokenizer.path (a tokenizer to load) or tokenizer.train "
                "(e.g. {vocabSize: 8000}); only with model.initFrom may both be omitted"
            )
        return self


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def format_validation_error(error: Any, prefix: str = "") -> str:
    """One line per problem, each naming the manifest field (camelCase path) and what to do."""
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if not str(p).startswith(("function-after", "tagged-union"))]
        path = ".".join([prefix, *loc] if prefix else loc)
        msg = item.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            msg = "unknown field; check its spelling (fields are camelCase) or remove it"
        elif item.get("type") == "missing":
            msg = "required field is missing; add it"
        head = re.match(r"^([a-z][A-Za-z0-9]*)\.[A-Za-z0-9.]+ ", msg)
        if head and loc and loc[-1] == head.group(1):
            # A cross-field check already names its field (e.g. "training.microBatchSize (3) ...").
            lines.append(".".join([prefix, *loc[:-1], msg] if prefix else [*loc[:-1], msg]))
        else:
            lines.append(f"{path}: {msg}" if path else msg)
    return "\n".join(lines)
