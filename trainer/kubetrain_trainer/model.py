"""Llama-style models from presets: build, count, and cost (FLOPs per token)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from kubetrain_api.config import ModelSpec
from transformers import LlamaConfig, LlamaForCausalLM

from .errors import ConfigError

# Shapes of the published models (Llama-2 7B/13B exactly; 1B is TinyLlama's 1.1B shape; 125m is
# GPT-3 Small's width/depth with Llama blocks). vocab_size follows the tokenizer unless overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=688, max_position_embeddings=2048),
    "llama-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048, max_position_embeddings=2048),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     intermediate_size=5632, max_position_embeddings=2048),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, max_position_embeddings=4096),
    "llama-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                      intermediate_size=13824, max_position_embeddings=4096),
}
PRESET_VOCAB = 32000
_COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
               attention_bias=False, mlp_bias=False, initializer_range=0.02)


def llama_config(spec: ModelSpec, vocab_size: int | None, seq_length: int) -> LlamaConfig:
    """The LlamaConfig for a preset plus the manifest's overrides; vocab follows the tokenizer."""
    fields: dict[str, Any] = {**_COMMON, **PRESETS[spec.preset], "vocab_size": PRESET_VOCAB}
    if vocab_size is not None:
        fields["vocab_size"] = _round_up(vocab_size, 64)
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], seq_length)
    known = set(LlamaConfig().to_dict())
    for key, value in spec.config.items():
        if key not in known:
            raise ConfigError(f"model.config.{key}: not a LlamaConfig field; check the spelling (snake_case, "
                              f"e.g. num_hidden_layers)")
        fields[key] = value
    if vocab_size is not None and fields["vocab_size"] < vocab_size:
        raise ConfigError(f"model.config.vocab_size ({fields['vocab_size']}) is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size}); remove the override or raise it")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ConfigError(f"model.config: hidden_size ({fields['hidden_size']}) must be a multiple of "
                          f"num_attention_heads ({fields['num_attention_heads']})")
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise ConfigError("model.config: num_attention_heads must be a multiple of num_key_value_heads")
    cfg = LlamaConfig(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_model(cfg: LlamaConfig, device: torch.device | str = "cpu", seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    return model


def load_pretrained_weights(model: LlamaForCausalLM, path: str) -> None:
    """model.initFrom: copy a Hugging Face model directory's weights into `model` (same architecture)."""
    try:
        src = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        model.load_state_dict(src.state_dict())
    except Exception as exc:
        raise ConfigError(f"model.initFrom: cannot load {path} into this model "
                          f"({type(exc).__name__}: {str(exc)[:300]})") from exc


def model_fingerprint(cfg: LlamaConfig) -> str:
    """Identifies the architecture (not the weights), so a checkpoint can be matched to a model."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "tie_word_embeddings", "mlp_bias", "attention_bias")
    shape = {k: getattr(cfg, k) for k in keys}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    non_embedding_parameters: int
    flops_per_token: float  # training (forward + backward), attention included

    def to_dict(self) -> dict[str, float]:
        return {"parameters": self.parameters, "nonEmbeddingParameters": self.non_embedding_parameters,
                "flopsPerToken": self.flops_per_token}


def model_cost(cfg: LlamaConfig, seq_length: int) -> ModelCost:
    """Parameter count and training FLOPs per token (6N for matmuls + 12·L·d·S for attention, as in PaLM).

    N excludes the input embedding (a lookup, no FLOPs) but includes the output projection.
    """
    d, layers, inter, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    head_dim = d // cfg.num_attention_heads
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter + 2 * d  # q,o + k,v + mlp + 2 norms
    embed = vocab * d
    head = 0 if cfg.tie_word_embeddings else vocab * d
    total = embed + head + layers * per_layer + d
    matmul_params = layers * (per_layer - 2 * d) + vocab * d
    flops = 6.0 * matmul_params + 12.0 * layers * d * seq_length
    return ModelCost(parameters=total, non_embedding_parameters=total - embed, flops_per_token=flops)
