"""Tokenizers: load one (HF dir, tokenizer.json, SentencePiece .model) or train a byte-level BPE.

Everything downstream uses the fast (Rust) tokenizer: a SentencePiece model is converted on load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import ConfigError

BOS, EOS = "<s>", "</s>"
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load from a Hugging Face tokenizer directory, a tokenizer.json, or a SentencePiece .model file."""
    p = Path(path)
    try:
        if p.is_dir():
            tok = AutoTokenizer.from_pretrained(str(p))
        elif p.suffix == ".json" and p.is_file():
            raw = Tokenizer.from_file(str(p))
            eos = next((t for t in _EOS_CANDIDATES if raw.token_to_id(t) is not None), None)
            tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos)
        elif ".model" in p.suffixes and p.is_file():  # tokenizer.model, also versioned (.model.v1)
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy(p, Path(tmp) / "tokenizer.model")
                tok = LlamaTokenizer.from_pretrained(tmp)
        elif not p.exists():
            raise ConfigError(f"tokenizer.path: {p} does not exist; give a tokenizer directory, a tokenizer.json "
                              f"or a SentencePiece .model, or use tokenizer.train")
        else:
            raise ConfigError(f"tokenizer.path: {p} is not a tokenizer directory, a .json or a .model file")
    except ConfigError:
        raise
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise ConfigError(f"tokenizer.path: cannot read {p} as a tokenizer ({type(exc).__name__}: {exc}); "
                          f"check the file, or use tokenizer.train") from exc
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer.path: {p} has no fast (Rust) tokenizer; convert it to tokenizer.json")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer.path: {p} defines no end-of-sequence token, which separates documents; "
                          f"add eos_token to its tokenizer_config.json")
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation, NFC normalisation) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's full definition: two tokenizers with equal fingerprints encode alike. Kept on
    the object (about 85 ms each for a 32k vocabulary, and a run asks for it four times: the cache key, the
    shards' index, the preflight, the trainer); a token added since makes it computed again."""
    cached = getattr(tok, "_kubetrain_fingerprint", None)
    if cached is not None and cached[0] == len(tok):
        return str(cached[1])
    spec = json.loads(tok.backend_tokenizer.to_str())
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    tok._kubetrain_fingerprint = (len(tok), fingerprint)
    return fingerprint
