"""kubetrain_trainer.tokenizer: a trained BPE, a saved tokenizer directory or tokenizer.json, a SentencePiece
model, and the errors for a missing or unreadable one."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetrain_trainer.errors import ConfigError
from kubetrain_trainer.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe


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


def test_the_fingerprint_kept_on_the_tokenizer_follows_added_tokens() -> None:
    tok = train_bpe(["to be or not to be " * 40, "that is the question " * 40], vocab_size=300)
    first = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok) == first
    tok.add_tokens(["<extra>"])  # it encodes differently now
    assert tokenizer_fingerprint(tok) != first
