"""kubetrain_trainer.preparation (and `kubetrain prepare`): clean-up, filtering, de-duplication, the validation
split, tokenisation and the shards it writes; input files it cannot use are named."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_trainer.errors import ConfigError
from kubetrain_trainer.preparation import (
    BIG_TEXT_FILE,
    batch_tokens,
    clean_text,
    document_hash,
    held_out,
    is_validation,
    prepare,
    resolve_inputs,
    split_text,
)
from kubetrain_trainer.shards import TokenShards
from kubetrain_trainer.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe
from support.runs import run_cli


def test_clean_text_normalises_and_trims() -> None:
    decomposed = "Cafe\u0301"  # e + combining accent → é
    raw = f"\ufeff{decomposed}\x00 line  \r\nnext\x07\r\n\n\n\n\nend\t \n"
    assert clean_text(raw) == "Caf\u00e9 line\nnext\n\nend"
    assert clean_text("  \n\x01\n ") == ""


def _clean_text_by_regex(text: str) -> str:
    """clean_text's definition, as it was written before it was made faster."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]", "", text)
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", text)).strip()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n\r\x00\x0ba\u200bé\u0301", max_size=120))
def test_clean_text_keeps_its_definition(text: str) -> None:
    assert clean_text(text) == _clean_text_by_regex(text)


def test_batch_tokens_end_every_document_with_eos_per_side(tokenizer) -> None:
    docs, sides = ["to be or not", "that is", "the question"], ["train", "validation", "train"]
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    out = batch_tokens(encodings, sides, eos, np.dtype(np.uint16))
    expected = {"train": [*encodings[0].ids, eos, *encodings[2].ids, eos], "validation": [*encodings[1].ids, eos]}
    assert {k: v.tolist() for k, v in out.items()} == expected and out["train"].dtype == np.uint16


def test_validation_split_is_deterministic_and_proportional() -> None:
    hashes = [document_hash(f"document {i}") for i in range(20000)]
    held = sum(is_validation(h, 0.1) for h in hashes)
    assert 1700 < held < 2300
    assert [is_validation(h, 0.1) for h in hashes] == [is_validation(h, 0.1) for h in hashes]


@pytest.fixture(scope="module")
def tokenizer(small_corpus: Path):
    from kubetrain_trainer.preparation import iter_training_texts

    return train_bpe(iter_training_texts(sorted(small_corpus.glob("*.txt")), "text", None, 10**7), 400)


def test_split_text_cuts_after_each_piece_at_a_paragraph_break_and_keeps_every_character() -> None:
    paragraphs = "".join(f"line {i} " + "x" * (i % 50) + ("\n\n" if i % 7 == 0 else "\n") for i in range(3000))
    pieces = list(split_text(paragraphs, 500))
    assert "".join(pieces) == paragraphs and len(pieces) > 100
    assert all(len(p) >= 500 and p.endswith("\n\n") for p in pieces[:-1])
    lines = "".join(f"line {i}\n" for i in range(3000))  # no paragraph break: cut at a line break
    assert all(p.endswith("\n") for p in split_text(lines, 500))
    assert [len(p) for p in split_text("a" * 50, 10)] == [10, 10, 10, 20]  # no break at all: exact lengths
    assert list(split_text("short", 10)) == ["short"] and list(split_text("", 10)) == []


def test_pieces_of_a_big_file_are_held_out_evenly_by_position() -> None:
    held = [i for i in range(1000) if held_out(0, i, 0.02)]
    assert len(held) == 20 and {b - a for a, b in itertools.pairwise(held)} == {50}
    assert held_out(document_hash("a"), None, 0.3) == is_validation(document_hash("a"), 0.3)


def test_one_big_text_file_is_split_into_documents_so_the_validation_share_holds(
        tmp_path: Path, corpus_files: list[Path], tokenizer) -> None:
    big = tmp_path / "plays.txt"
    big.write_text("\n\n".join(f.read_text() for f in corpus_files[:20]))
    assert big.stat().st_size > BIG_TEXT_FILE
    stats = prepare([big], tokenizer, tmp_path / "big", validation_split=0.02)
    share = stats.tokens["validation"] / (stats.tokens["train"] + stats.tokens["validation"])
    assert stats.documents_in > 100 and stats.documents["validation"] == stats.documents_in * 2 // 100
    assert 0.01 < share < 0.03
    one_play = tmp_path / "play.txt"  # under the threshold a .txt stays one document
    one_play.write_text(corpus_files[0].read_text())
    assert prepare([one_play], tokenizer, tmp_path / "small", validation_split=0.02).documents_in == 1


def test_prepare_dedups_drops_tiny_and_separates_documents_with_eos(tmp_path: Path, tokenizer) -> None:
    src = tmp_path / "in"
    src.mkdir()
    docs = ["The quality of mercy is not strained.", "It droppeth as the gentle rain from heaven.",
            "Upon the place beneath: it is twice blest."]
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in [*docs, docs[0], "tiny", ""]) + "\n")
    (src / "b.txt").write_text(docs[1] + "  \n")  # a duplicate once cleaned
    stats = prepare(resolve_inputs(str(src), "x"), tokenizer, tmp_path / "out", validation_split=0.0,
                    min_document_chars=10, shard_tokens=16)
    assert stats.documents_in == 7 and stats.documents_duplicate == 2 and stats.documents_dropped_small == 2
    assert stats.documents == {"train": 3, "validation": 0}
    index = json.loads((tmp_path / "out/train/index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokenizer"] == tokenizer_fingerprint(tokenizer)
    assert len(index["shards"]) > 1 and all(s["tokens"] <= 16 for s in index["shards"])
    stream = np.concatenate([np.fromfile(tmp_path / "out/train" / s["file"], dtype=np.uint16)
                             for s in index["shards"]])
    eos = tokenizer.eos_token_id
    expected = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False).input_ids, eos]]
    assert stream.tolist() == expected
    assert index["tokens"] == len(expected) == stats.tokens["train"]
    # The saved tokenizer is the one used.
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "out" / "tokenizer")) == index["tokenizer"]


def test_prepare_reads_parquet_and_separate_validation(tmp_path: Path, tokenizer) -> None:
    pq.write_table(pa.table({"body": [f"Document number {i} has some words in it." for i in range(50)]}),
                   tmp_path / "train.parquet")
    (tmp_path / "val.jsonl").write_text(json.dumps({"body": "A held-out document of a few words."}) + "\n")
    stats = prepare([tmp_path / "train.parquet"], tokenizer, tmp_path / "out",
                    validation_files=[tmp_path / "val.jsonl"], text_field="body")
    assert stats.documents == {"train": 50, "validation": 1}
    with pytest.raises(ConfigError, match=r"data.textField: .* has no column 'text'"):
        prepare([tmp_path / "train.parquet"], tokenizer, tmp_path / "out2")


def test_missing_inputs_and_non_shard_dirs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.train: no input files match"):
        resolve_inputs(str(tmp_path / "nothing*.txt"), "data.train")
    with pytest.raises(ConfigError, match=r"data.validation: .* is not a prepared shard directory"):
        TokenShards(tmp_path, 8, "data.validation")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match=r"is not .txt, .jsonl or .parquet"):
        resolve_inputs(str(tmp_path / "x.csv"), "data.train")


def test_prepare_cli_with_sentencepiece_tokenizer(small_corpus: Path, tmp_path: Path) -> None:
    """`kubetrain prepare` with a real 32k Llama SentencePiece model (from mistral-common): uint16 shards."""
    import mistral_common

    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    result = run_cli("prepare", "--input", small_corpus, "--tokenizer", spm, "--output", tmp_path / "out",
                     "--validation-split", "0.2")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out/train/index.json").read_text())
    assert index["vocabSize"] == 32000 and index["dtype"] == "uint16" and index["eosTokenId"] == 2
    assert index["tokens"] > 100_000
    assert json.loads((tmp_path / "out/validation/index.json").read_text())["documents"] >= 1
