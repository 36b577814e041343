"""kubetrain_trainer.model: the Llama presets, model.config overrides and vocabulary rules, and the
parameter and FLOP counts (model_cost) against the model transformers builds."""

from __future__ import annotations

import pytest
import torch
from kubetrain_api.config import ModelSpec
from kubetrain_trainer.errors import ConfigError
from kubetrain_trainer.model import llama_config, model_cost


def test_llama_7b_preset_is_llama_2_7b() -> None:
    from transformers import LlamaForCausalLM

    cfg = llama_config(ModelSpec(preset="llama-7b"), 32000, 4096)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size) == (4096, 32, 32, 11008, 32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    actual = sum(p.numel() for p in model.parameters())
    cost = model_cost(cfg, 4096)
    assert actual == cost.parameters == 6_738_415_616
    # 6N + attention: ~4.7e10 FLOPs per token at 4096 tokens
    assert 4.5e10 < cost.flops_per_token < 4.9e10


@pytest.mark.parametrize("preset", ["tiny", "llama-125m", "llama-1b", "llama-13b"])
def test_cost_matches_the_built_model(preset: str) -> None:
    from transformers import LlamaForCausalLM

    cfg = llama_config(ModelSpec(preset=preset), 8000, 256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == model_cost(cfg, 256).parameters


def test_model_overrides_and_vocab_rules() -> None:
    cfg = llama_config(ModelSpec(preset="tiny", config={"num_hidden_layers": 3}), 1000, 512)
    assert cfg.num_hidden_layers == 3 and cfg.vocab_size == 1024  # padded to a multiple of 64
    with pytest.raises(ConfigError, match=r"model.config.vocab_size .* is smaller than the tokenizer"):
        llama_config(ModelSpec(config={"vocab_size": 100}), 1000, 512)
    with pytest.raises(ConfigError, match=r"hidden_size .* multiple of num_attention_heads"):
        llama_config(ModelSpec(config={"hidden_size": 100, "num_attention_heads": 3}), 1000, 512)
