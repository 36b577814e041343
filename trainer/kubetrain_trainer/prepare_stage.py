"""The data preparation stage of a cluster job: `python -m kubetrain_trainer.prepare_stage`.

    --config CONFIG.json --to LOCATION [--step all|tokenizer|part|merge] [--part I] [--parts N]

From the trainer config (raw text: files, globs, s3:// prefixes or globs, corpus://…; a tokenizer to train or
to load), the same code as `kubetrain run`'s preparation (preparation.py, tokenizer.py: cleaning,
de-duplication, tokenizer training, tokenisation, sharding) writes the layout kubetrain_api.preparation
describes under LOCATION (a directory or an s3:// prefix). Steps:

- `tokenizer`: trains (or copies) the tokenizer once, before the fan-out;
- `part` (I of N; I defaults to $JOB_COMPLETION_INDEX, as an Indexed Job sets it): tokenises its share of
  the input files (every N-th, from the I-th, in sorted order) into `train/part-I/`, `validation/part-I/`;
- `merge`: writes one index per side over every part's shards, checks the whole output against a listing,
  and writes the marker `PREPARED.json` last;
- `all`: the three in one process with one part (a single-pod stage, or a worker's init container).

Every step first fingerprints the inputs' content (S3 ETags and sizes, local sizes and modification times)
and the settings; a marker with that fingerprint means "done": the step exits at once. De-duplication is
exact within a part; with N > 1 parts a document repeated in two parts' files is kept in both.
Exit codes: 0 done (or reused), 2 a configuration or input problem (the message names the field).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain_api.config import TrainerConfig, format_validation_error
from kubetrain_api.exit_codes import EXIT_CONFIG
from kubetrain_api.preparation import (
    MARKER,
    RAW_SUFFIXES,
    SIDES,
    STAGE_MODULE,
    STEPS,
    TOKENIZER_DIR,
    TOKENIZER_MARKER,
    part_key,
    settings_fingerprint,
)

from . import preparation as datamod
from .errors import ConfigError
from .storage import LocalStore, Store, open_store, put_tree, split_s3_uri

Log = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """One input file: where it is (a local path or an s3:// URI) and what identifies its content."""

    uri: str
    identity: str  # "size:mtime_ns" locally, "etag:size" on S3

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


# --- inputs ---------------------------------------------------------------------------------------------------


def list_sources(spec: str, field_name: str, cfg: TrainerConfig) -> list[Source]:
    """The input files a data path names, sorted, each with its content identity; s3:// prefixes and globs
    are listed (nothing is downloaded), local ones resolved as `kubetrain run` resolves them."""
    if not spec.startswith("s3://"):
        files = datamod.resolve_inputs(spec, field_name)
        return [Source(str(f), f"{f.stat().st_size}:{f.stat().st_mtime_ns}") for f in files]
    from .storage import S3Store

    bucket, _ = split_s3_uri(spec)
    rest = spec.removeprefix(f"s3://{bucket}/")
    globbed = any(c in rest for c in "*?[")
    if globbed:
        fixed = rest[: min(rest.index(c) for c in "*?[" if c in rest)]
        prefix = fixed.rsplit("/", 1)[0] + "/" if "/" in fixed else ""
    elif rest.endswith(RAW_SUFFIXES):
        prefix = rest.rsplit("/", 1)[0] + "/" if "/" in rest else ""
    else:
        prefix = rest.rstrip("/") + "/" if rest else ""
    store = S3Store(f"s3://{bucket}/{prefix}", cfg.s3)
    try:
        listing = store._list_objects("")
    except Exception as exc:
        raise ConfigError(f"{field_name}: cannot list {spec} ({type(exc).__name__}: {str(exc)[:200]}); check "
                          f"the bucket, s3.endpoint and the credentials") from exc
    sources = []
    for key, obj in sorted(listing.items()):
        full = prefix + key
        if globbed and not fnmatch.fnmatchcase(full, rest):
            continue
        if not globbed and rest.endswith(RAW_SUFFIXES) and full != rest:
            continue
        if key.endswith(RAW_SUFFIXES) and "/." not in "/" + key:
            sources.append(Source(f"s3://{bucket}/{full}", f"{obj['ETag'].strip(chr(34))}:{obj['Size']}"))
    if not sources:
        raise ConfigError(f"{field_name}: no .txt/.jsonl/.parquet objects match {spec}; upload raw text there, or "
                          f"point it at prepared shards (a prefix holding index.json) with tokenizer.path")
    return sources


def materialize(sources: list[Source], dest: Path, cfg: TrainerConfig) -> Iterator[Path]:
    """Each source as a local file, in order: local ones as they are, S3 objects downloaded (one at a time)."""
    from .storage import S3Store

    for i, src in enumerate(sources):
        if not src.uri.startswith("s3://"):
            yield Path(src.uri)
            continue
        bucket, key = split_s3_uri(src.uri)
        tag = hashlib.sha256(f"{src.uri}\0{src.identity}".encode()).hexdigest()[:12]
        target = dest / f"{i:06d}-{tag}-{src.name}"  # the content's identity, and the suffix that says how to read it
        if not target.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            store = S3Store(f"s3://{bucket}/", cfg.s3)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(store.get(key.rstrip("/")))
            tmp.rename(target)
        yield target


def inputs_fingerprint(cfg: TrainerConfig, train: list[Source], validation: list[Source] | None,
                       **extra: Any) -> str:
    """Changes when any input's content identity, the settings, the stage's format or the rule that cuts big
    .txt files changes."""
    doc = {"settings": settings_fingerprint(cfg), "shards": datamod.FORMAT_VERSION,
           "bigTextFile": datamod.BIG_TEXT_FILE, "textPiece": datamod.TEXT_PIECE, **extra,
           "train": [(s.uri, s.identity) for s in train],
           "validation": [(s.uri, s.identity) for s in validation or []]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


# --- the stage ------------------------------------------------------------------------------------------------


class Stage:
    """One run of a step against one location; `workdir` holds downloads and the local output of a part."""

    def __init__(self, cfg: TrainerConfig, location: str, workdir: Path, log: Log = print):
        self.cfg, self.location, self.workdir, self.log = cfg, location.rstrip("/") + "/", workdir, log
        self.store: Store = open_store(self.location, cfg.s3)
        d = cfg.data
        self.train = list_sources(d.train, "data.train", cfg)
        self.validation = list_sources(d.validation, "data.validation", cfg) if d.validation else None
        self.split = None if self.validation else d.effective_validation_split
        self.key = inputs_fingerprint(cfg, self.train, self.validation)

    # markers ---------------------------------------------------------------------------------------------

    def _read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at `key`, or None when there is none (or it is not one)."""
        from botocore.exceptions import ClientError

        try:
            value = json.loads(self.store.get(key))
        except FileNotFoundError:
            return None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def prepared(self) -> bool:
        """The marker is there, for these inputs, and every file it lists is there with its size."""
        marker = self._read_json(MARKER)
        if marker is None or marker.get("inputs") != self.key:
            return False
        listing = self.store.list("")
        files = marker.get("files") or {}
        return bool(files) and all(listing.get(k) == size for k, size in files.items())

    # steps -----------------------------------------------------------------------------------------------

    def run(self, step: str, part: int = 0, parts: int = 1) -> str:
        """'reused' when the marker says the output is there for these inputs, else 'prepared'."""
        if self.prepared():
            self.log(f"prepared data for these inputs are already at {self.location} ({MARKER}): reusing them")
            return "reused"
        if step in ("all", "tokenizer"):
            self.tokenizer()
        if step == "all":
            self.part(0, 1)
            self.merge(1)
        elif step == "part":
            self.part(part, parts)
        elif step == "merge":
            self.merge(parts)
        return "prepared"

    def tokenizer_key(self) -> str:
        t = self.cfg.tokenizer
        return inputs_fingerprint(self.cfg, self.train if t.train else [], None, tokenizer=t.to_wire(),
                                  split=self.split)

    def tokenizer(self) -> None:
        """The tokenizer under tokenizer/, trained (or copied from tokenizer.path / model.initFrom) once."""
        from .tokenizer import load_tokenizer, train_bpe

        done = self._read_json(TOKENIZER_MARKER)
        if done is not None and done.get("inputs") == self.tokenizer_key():
            self.log("tokenizer already prepared for these inputs")
            return
        t, d = self.cfg.tokenizer, self.cfg.data
        tok: Any
        if t.train is not None:
            self.log(f"training a {t.train.vocab_size}-token byte-level BPE on {len(self.train)} file(s) ...")
            tok = train_bpe(self._training_texts(t.train.sample_chars), t.train.vocab_size, t.train.min_frequency)
        else:
            from .storage import local_copy

            path = t.path or self.cfg.model.init_from
            if path is None:  # TrainerConfig's own validation makes one of the three present
                raise ConfigError("tokenizer: set tokenizer.path or tokenizer.train")
            tok = load_tokenizer(local_copy(path, self.workdir / "tokenizer-given", self.cfg.s3, "tokenizer.path"))
        local = self.workdir / "tokenizer-out"
        shutil.rmtree(local, ignore_errors=True)
        tok.save_pretrained(str(local))
        self.store.delete_prefix(TOKENIZER_DIR + "/")
        put_tree(self.store, local, TOKENIZER_DIR + "/")
        self.store.put(TOKENIZER_MARKER, _dumps({"inputs": self.tokenizer_key(), "textField": d.text_field}))

    def _training_texts(self, budget: int) -> Iterator[str]:
        """iter_training_texts over the training files, downloading each only when the budget reaches it."""
        used = 0
        for path in materialize(self.train, self.workdir / "inputs" / "train", self.cfg):
            for text in datamod.iter_training_texts([path], self.cfg.data.text_field, self.split, budget - used):
                used += len(text)
                yield text
            if used >= budget:
                return

    def _load_tokenizer(self) -> Any:
        from .tokenizer import load_tokenizer

        done = self._read_json(TOKENIZER_MARKER)
        if done is None or done.get("inputs") != self.tokenizer_key():
            raise StageError(f"the tokenizer for these inputs is not at {self.location}{TOKENIZER_DIR}/ yet: run "
                             f"--step tokenizer first")
        if isinstance(self.store, LocalStore):
            return load_tokenizer(self.store.root / TOKENIZER_DIR)
        from .storage import local_copy

        return load_tokenizer(local_copy(self.location + TOKENIZER_DIR + "/", self.workdir / "tokenizer",
                                         self.cfg.s3, "tokenizer.path"))

    def part(self, part: int, parts: int) -> None:
        """Part `part` of `parts`: its share of the files tokenised into <side>/part-NNNNN/."""
        if not 0 <= part < parts:
            raise ConfigError(f"--part {part} is not within 0..{parts - 1}")
        if self._part_record(part, parts) is not None:
            self.log(f"part {part} of {parts} already prepared")
            return
        tokenizer = self._load_tokenizer()
        d = self.cfg.data
        train = self.train[part::parts]
        validation = self.validation[part::parts] if self.validation else None
        inputs = self.workdir / "inputs"
        train_files = list(materialize(train, inputs / "train", self.cfg))
        val_files = list(materialize(validation, inputs / "validation", self.cfg)) if validation else None
        out = self.workdir / f"part-{part:05d}"
        self.log(f"preparing part {part} of {parts}: {len(train_files)} training file(s) → {self.location}")
        stats = datamod.prepare(train_files, tokenizer, out, validation_files=val_files or None,
                                validation_split=self.split or 0.0, text_field=d.text_field,
                                min_document_chars=d.min_document_chars, extra_meta={"inputs": self.key})
        indexes = {}
        for side in SIDES:
            index = json.loads((out / side / datamod.INDEX).read_text())
            indexes[side] = index
            self.store.delete_prefix(f"{side}/part-{part:05d}/")
            put_tree(self.store, out / side, f"{side}/part-{part:05d}/", skip=(datamod.INDEX,))
        self.store.put(part_key(part), _dumps({"inputs": self.key, "part": part, "parts": parts,
                                               "indexes": indexes, "stats": stats.to_dict()}))
        shutil.rmtree(out, ignore_errors=True)
        self.log(f"part {part}: {stats.documents['train']} train / {stats.documents['validation']} validation "
                 f"documents, {stats.tokens['train']:,} / {stats.tokens['validation']:,} tokens; dropped "
                 f"{stats.documents_dropped_small} tiny and {stats.documents_duplicate} duplicate documents")

    def _part_record(self, part: int, parts: int) -> dict[str, Any] | None:
        """The part's record if it was prepared for these inputs and its shards are all there at their sizes."""
        rec = self._read_json(part_key(part))
        if rec is None or rec.get("inputs") != self.key or rec.get("parts") != parts:
            return None
        for side in SIDES:
            index = rec["indexes"][side]
            listing = self.store.list(f"{side}/part-{part:05d}/")
            if any(listing.get(f"{side}/part-{part:05d}/{s['file']}") != s["tokens"] * _itemsize(index["dtype"])
                   for s in index["shards"]):
                return None
        return rec

    def merge(self, parts: int) -> None:
        """One index per side over every part's shards; the output checked against a listing; the marker."""
        records = []
        for part in range(parts):
            rec = self._part_record(part, parts)
            if rec is None:
                raise StageError(f"part {part} of {parts} has not been prepared for these inputs at "
                                 f"{self.location}{part_key(part)}; run --step part for it first")
            records.append(rec)
        files: dict[str, int] = {}
        listing = self.store.list("")
        for key in listing:
            if key.startswith(TOKENIZER_DIR + "/"):
                files[key] = listing[key]
        totals: dict[str, Any] = {"documentsIn": 0, "documentsDroppedSmall": 0, "documentsDuplicate": 0,
                                  "characters": 0, "documents": dict.fromkeys(SIDES, 0),
                                  "tokens": dict.fromkeys(SIDES, 0)}
        for side in SIDES:
            first = records[0]["indexes"][side]
            shards = []
            for rec in records:
                index = rec["indexes"][side]
                for shard in index["shards"]:
                    name = f"part-{rec['part']:05d}/{shard['file']}"
                    shards.append({"file": name, "tokens": shard["tokens"]})
                    files[f"{side}/{name}"] = shard["tokens"] * _itemsize(index["dtype"])
            merged = {key: first[key] for key in ("version", "dtype", "tokenizer", "vocabSize", "eosTokenId")
                      if key in first}
            merged.update({"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                           "documents": sum(int(r["indexes"][side].get("documents", 0)) for r in records),
                           "inputs": self.key, "parts": parts})
            self.store.put(f"{side}/{datamod.INDEX}", _dumps(merged))
            files[f"{side}/{datamod.INDEX}"] = len(_dumps(merged))
        for rec in records:
            s = rec["stats"]
            for k in ("documentsIn", "documentsDroppedSmall", "documentsDuplicate", "characters"):
                totals[k] += int(s.get(k, 0))
            for side in SIDES:
                totals["documents"][side] += int(s["documents"][side])
                totals["tokens"][side] += int(s["tokens"][side])
        listing = self.store.list("")
        wrong = sorted(k for k, size in files.items() if listing.get(k) != size)
        if wrong or not any(k.startswith(TOKENIZER_DIR + "/") for k in files):
            raise StageError(f"the prepared output at {self.location} is incomplete (missing or of the wrong size: "
                             f"{', '.join(wrong[:5]) or 'the tokenizer'}); run the stage again")
        self.store.put(MARKER, _dumps({"inputs": self.key, "parts": parts, "files": files, "stats": totals}))
        self.log(f"prepared {totals['documents']['train']} train / {totals['documents']['validation']} validation "
                 f"documents, {totals['tokens']['train']:,} / {totals['tokens']['validation']:,} tokens in "
                 f"{parts} part(s) → {self.location}")


class StageError(Exception):
    """A step run out of order or over an incomplete output: a retry (of the Job) can fix it."""


def _itemsize(dtype: str) -> int:
    return {"uint16": 2, "uint32": 4}[dtype]


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def run_stage(cfg: TrainerConfig, location: str, step: str = "all", part: int = 0, parts: int = 1,
              scratch: Path | None = None, log: Log = print) -> str:
    """Run one step; 'reused' or 'prepared'. Downloads and a part's local output go to a temporary directory
    (under `scratch` if given), removed afterwards."""
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kubetrain-stage-", dir=scratch))
    try:
        return Stage(cfg, location, work, log).run(step, part, parts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {STAGE_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the trainer config (JSON, camelCase)")
    parser.add_argument("--to", required=True, help="where the prepared data go: a directory or an s3:// prefix")
    parser.add_argument("--step", choices=STEPS, default="all")
    parser.add_argument("--part", type=int, help="this part's index (default: $JOB_COMPLETION_INDEX, else 0)")
    parser.add_argument("--parts", type=int, default=1, help="how many parts the input files are split into")
    parser.add_argument("--workdir", help="scratch space for downloads and a part's output (default: $TMPDIR)")
    args = parser.parse_args(argv)
    try:
        from pydantic import ValidationError

        try:
            cfg = TrainerConfig.model_validate_json(Path(args.config).read_text())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from exc
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {args.config} ({exc.strerror})") from exc
        if args.parts < 1:
            raise ConfigError("--parts must be at least 1")
        part = args.part if args.part is not None else int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
        outcome = run_stage(cfg, args.to, args.step, part, args.parts,
                            Path(args.workdir) if args.workdir else None, lambda m: print(m, flush=True))
        print(f"{args.step}: {outcome}", flush=True)
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
