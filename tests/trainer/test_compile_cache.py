"""kubetrain_trainer.compile_cache: inductor's cache kept beside the checkpoints (LocalStore, and S3Store on
moto_server), so that a run restarted on a fresh disk compiles warm; and the whole path through `kubetrain run`:
a compiled run stores its cache, and a restart with an empty local cache restores it and misses nothing."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from kubetrain_api.config import S3Spec, TrainingSpec
from kubetrain_trainer import compile_cache
from kubetrain_trainer.storage import LocalStore, S3Store
from support import job_manifest, training_spec, write_manifest
from support.runs import read_events, run_cli
from support.s3 import MotoServer

KEY = "compile-cache/torch-test.tar.gz"


def fill(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


def test_unset_compile_compiles_long_runs_only() -> None:
    assert TrainingSpec.model_validate({"maxSteps": 999}).compiles is False
    assert TrainingSpec.model_validate({"maxSteps": 1000}).compiles is True
    assert TrainingSpec.model_validate({"maxSteps": 5, "compile": True}).compiles is True
    assert TrainingSpec.model_validate({"maxSteps": 5000, "compile": False}).compiles is False


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_published_cache_restores_into_an_empty_directory(kind: str, s3: MotoServer, bucket: str,
                                                           tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store") if kind == "local" else \
        S3Store(f"s3://{bucket}/cc-{tmp_path.name}/", S3Spec.model_validate(s3.s3_section()))
    first = tmp_path / "first"
    fill(first, {"fxgraph/ab/entry": b"graph", "cd/kernel.so": b"\x7fELF" + bytes(300), "locks/x.lock": b""})
    state = compile_cache.restore(store, first, KEY)  # nothing stored yet: a cold cache
    assert not state.restored
    fill(first, {"ef/new.py": b"# compiled"})  # what this run's first step compiled
    assert compile_cache.publish(store, state) > 0
    assert compile_cache.publish(store, state) == 0  # nothing new since

    second = tmp_path / "second"
    restored = compile_cache.restore(store, second, KEY)
    assert restored.restored
    assert compile_cache.cache_files(second) == {"fxgraph/ab/entry", "cd/kernel.so", "ef/new.py"}  # no locks
    assert (second / "cd" / "kernel.so").read_bytes() == b"\x7fELF" + bytes(300)
    assert compile_cache.publish(store, restored) == 0


def test_an_archive_reaching_outside_the_cache_is_not_unpacked(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    store.put(KEY, buffer.getvalue())
    state = compile_cache.restore(store, tmp_path / "cache", KEY)
    assert not state.restored  # logged, and compiled cold: a cache never fails a run
    assert not (tmp_path / "escaped").exists()


def test_the_cache_directory_is_the_runs_own_unless_the_user_set_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compile_cache.CACHE_ENV, "")  # recorded, so that the value set below is undone too
    monkeypatch.delenv(compile_cache.CACHE_ENV)
    assert compile_cache.cache_directory(tmp_path) == (tmp_path / "compile-cache").resolve()
    assert os.environ[compile_cache.CACHE_ENV] == str((tmp_path / "compile-cache").resolve())
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str((tmp_path / "compile-cache").resolve())  # what inductor itself now uses
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_directory(tmp_path / "out") == tmp_path / "mine"


@pytest.mark.slow
def test_a_restart_on_a_fresh_disk_compiles_from_the_stored_cache(prepared: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"  # shared by both runs, as a job's checkpoint.uri is by its pods
    events = []
    for run, steps in (("first", 3), ("restarted", 4)):
        manifest = write_manifest(tmp_path / f"{run}.yaml", job_manifest(
            spec=training_spec(prepared), training={"maxSteps": steps, "evalEvery": 0, "compile": True},
            checkpoint={"everySteps": 0, "uri": str(checkpoints)}))
        result = run_cli("run", manifest, "--output", tmp_path / run)  # a fresh output: an empty local cache
        assert result.returncode == 0, result.stderr
        [compiled] = read_events(tmp_path / run, "compile")
        events.append(compiled)
    first, restarted = events
    assert not first["cacheRestored"] and first["cacheMisses"] > 0 and first["storedBytes"] > 0
    assert restarted["cacheRestored"] and restarted["cacheMisses"] == 0 and restarted["cacheHits"] > 0
    assert read_events(tmp_path / "restarted", "start")[0]["startStep"] == 3
    assert Path(first["cacheUri"]).is_file() and Path(first["cacheUri"]).parent == checkpoints / "compile-cache"
    assert json.loads((tmp_path / "restarted" / "results.json").read_text())["steps"] == 4
