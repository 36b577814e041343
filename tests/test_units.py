"""Pure pieces of the trainer: sampler, schedule, presets and costs, tokenizers, checkpoint discovery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_api.config import ModelSpec, TrainingSpec
from kubetrain_trainer.checkpoint import MARKER, CheckpointManager
from kubetrain_trainer.errors import ConfigError
from kubetrain_trainer.model import llama_config, model_cost
from kubetrain_trainer.optim import lr_at
from kubetrain_trainer.sampler import eval_micro_batches, global_batch, permute, rank_micro_batches
from kubetrain_trainer.storage import LocalStore
from kubetrain_trainer.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2**31))
def test_permute_is_a_bijection(n: int, key: int) -> None:
    out = permute(np.arange(n), n, key)
    assert sorted(out.tolist()) == list(range(n))


def test_permute_depends_on_key() -> None:
    assert permute(np.arange(100), 100, 1).tolist() != permute(np.arange(100), 100, 2).tolist()


@settings(max_examples=40, deadline=None)
@given(step=st.integers(0, 1000), world=st.sampled_from([1, 2, 4, 8]), micro=st.sampled_from([1, 2, 4]),
       n=st.integers(64, 3000))
def test_rank_slices_concatenate_to_the_global_batch(step: int, world: int, micro: int, n: int) -> None:
    g = world * micro * 4
    parts = [np.concatenate(rank_micro_batches(step, g, micro, n, 9, r, world)) for r in range(world)]
    assert np.concatenate(parts).tolist() == global_batch(step, g, n, 9).tolist()
    assert all(len(m) == micro for r in range(world) for m in rank_micro_batches(step, g, micro, n, 9, r, world))


def test_each_epoch_visits_every_sequence_once_in_a_new_order() -> None:
    n, g = 96, 16
    epoch0 = np.concatenate([global_batch(s, g, n, 3) for s in range(6)])
    epoch1 = np.concatenate([global_batch(s, g, n, 3) for s in range(6, 12)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(n))
    assert epoch0.tolist() != epoch1.tolist()


def test_eval_batches_cover_the_eval_set_once_for_any_world_size() -> None:
    for world in (1, 2, 3, 8):
        seen = [i for r in range(world) for b in eval_micro_batches(50, 4, r, world) for i in b.tolist()]
        assert sorted(seen) == list(range(50))


def test_schedule_warmup_and_decays() -> None:
    spec = TrainingSpec(max_steps=110, optimizer={"lr": 1.0}, schedule={"warmup_steps": 10, "min_lr_ratio": 0.1})
    assert lr_at(0, spec) == pytest.approx(0.1) and lr_at(9, spec) == pytest.approx(1.0)
    assert lr_at(10, spec) == pytest.approx(1.0)
    assert lr_at(60, spec) == pytest.approx(0.55)  # cosine midpoint between 1.0 and 0.1
    assert lr_at(109, spec) == pytest.approx(0.1, abs=1e-3)
    linear = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"decay": "linear"})})
    assert lr_at(60, linear) == pytest.approx(0.55) and lr_at(35, linear) == pytest.approx(0.775)
    const = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"decay": "constant"})})
    assert lr_at(100, const) == 1.0


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


def test_tokenizer_sources(tmp_path: Path) -> None:
    texts = ["to be or not to be, that is the question"] * 50 + ["whether tis nobler in the mind to suffer"] * 50
    tok = train_bpe(texts, 300)
    assert tok.decode(tok("to be or not", add_special_tokens=False).input_ids) == "to be or not"
    tok.save_pretrained(str(tmp_path / "dir"))
    from_dir = load_tokenizer(tmp_path / "dir")
    from_json = load_tokenizer(tmp_path / "dir" / "tokenizer.json")
    assert tokenizer_fingerprint(from_dir) == tokenizer_fingerprint(from_json) == tokenizer_fingerprint(tok)
    assert from_json.eos_token == "</s>"
    import mistral_common

    spm = load_tokenizer(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    assert len(spm) == 32000 and spm.eos_token_id == 2
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "broken.model").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_tokenizer(tmp_path / "broken.model")


def test_checkpoint_discovery_ignores_uncommitted_and_damaged(tmp_path: Path) -> None:
    manager = CheckpointManager(LocalStore(tmp_path), keep=2, rank=0, fingerprints={"model": "m"})
    for step, committed in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"step-{step:09d}"
        d.mkdir()
        (d / "data").write_bytes(b"x" * step)
        if committed:
            (d / MARKER).write_text(json.dumps({"step": step, "files": {"data": step}, "model": "m"}))
    assert manager.committed_steps() == [10, 20] and manager.latest() == 20
    (tmp_path / "step-000000020" / "data").write_bytes(b"short")  # damaged after commit
    assert manager.latest() == 10
    (tmp_path / "step-000000010" / MARKER).write_text(json.dumps({"step": 10, "files": {"data": 10}, "model": "z"}))
    with pytest.raises(ConfigError, match=r"different model architecture"):
        manager.check_compatible(10)


def test_a_local_checkpoint_changed_after_its_commit_is_never_loaded(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    manager = CheckpointManager(LocalStore(tmp_path), keep=3, rank=0, fingerprints={"model": "m"})
    for step in (1, 2):
        manager.save(step, model, opt, {"step": step}, asynchronous=False)
    marker = json.loads((tmp_path / "step-000000002" / MARKER).read_text())
    name = next(n for n in marker["files"] if n.endswith(".distcp"))
    assert marker["files"][name]["checksum"].startswith("crc32:") and manager.latest() == 2
    path = tmp_path / "step-000000002" / name
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one flipped bit, same size: bit rot, or a stray writer
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert manager.latest() == 1
    assert f"{name} has changed since it was committed" in caplog.text


def test_staging_buffers_prepared_in_the_background_are_the_ones_saves_use(tmp_path: Path) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(LocalStore(tmp_path), keep=2, rank=0, fingerprints={"model": "m"})
    manager.prepare(model, optimizer)  # no optimizer state yet: nothing to size the buffers by
    assert manager._preparing is None
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    manager.prepare(model, optimizer)
    assert manager._preparing is not None
    manager._preparing.join()
    cache = manager._writer_for().state_dict_cache
    staged = cache["model"]["0.weight"]
    assert staged.data_ptr() != model[0].weight.data_ptr() and torch.count_nonzero(staged) == 0  # touched, zeroed
    manager.save(1, model, optimizer, {"step": 1}, asynchronous=True)
    result = manager.wait()
    assert result is not None and result.ok
    assert manager._writer_for().state_dict_cache is cache and torch.equal(staged, model[0].weight.detach())
    assert manager.latest() == 1


def test_a_retention_failure_never_fails_or_loses_a_committed_save(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Deleting old checkpoints fails (an immutable directory: not even root may delete in it); the new
    checkpoint is still reported committed and kept, and the old one is deleted by a later retention."""
    import subprocess

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    results: list = []
    manager = CheckpointManager(LocalStore(tmp_path), keep=1, rank=0, fingerprints={"model": "m"},
                                on_result=results.append)
    manager.save(1, model, optimizer, {"step": 1}, asynchronous=False)
    old = tmp_path / "step-000000001"
    attempt = next(p for p in old.iterdir() if p.is_dir())
    subprocess.run(["chattr", "+i", str(attempt)], check=True)
    try:
        manager.save(2, model, optimizer, {"step": 2}, asynchronous=False)
    finally:
        subprocess.run(["chattr", "-i", str(attempt)], check=True)
    assert [r.ok for r in results] == [True, True]
    # step 2 is whole; step 1 lost its COMMITTED marker first (it is never half-deleted yet loadable)
    assert manager.committed_steps() == [2] and manager.latest() == 2 and attempt.exists()
    assert "could not delete old checkpoints" in caplog.text
    manager.save(3, model, optimizer, {"step": 3}, asynchronous=False)
    assert manager.committed_steps() == [3] and manager.latest() == 3 and not old.exists()
