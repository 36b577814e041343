"""kubetrain_trainer.checkpoint's CheckpointManager: discovery of committed checkpoints, checksums that keep a
changed checkpoint from being loaded, the staging buffers saves reuse, retention (agreeing with latest()),
exclusive commits (a lost response is still this writer's commit; another writer's is reported as such) and
the clean-up at start (this prefix's checkpoint uploads only), on a local directory and on S3 (moto_server)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import ReadTimeoutError
from kubetrain_api.config import CheckpointSpec, S3Spec
from kubetrain_trainer.checkpoint import MARKER, CheckpointManager
from kubetrain_trainer.errors import ConfigError
from kubetrain_trainer.storage import LocalStore, S3Store
from support.s3 import MotoServer, incomplete_uploads

# -- on a local directory -------------------------------------------------------------------------------


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


def test_a_local_checkpoint_changed_after_its_commit_is_never_loaded(tmp_path: Path, world_of_one: None,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
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


def test_staging_buffers_prepared_in_the_background_are_the_ones_saves_use(tmp_path: Path,
                                                                           world_of_one: None) -> None:
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


def test_a_retention_failure_never_fails_or_loses_a_committed_save(tmp_path: Path, world_of_one: None,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Deleting old checkpoints fails (an immutable directory: not even root may delete in it); the new
    checkpoint is still reported committed and kept, and the old one is deleted by a later retention."""
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


def test_the_catalogue_lists_what_retention_keeps_with_each_commits_time(tmp_path: Path, world_of_one: None) -> None:
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    results: list = []
    store = LocalStore(tmp_path)
    manager = CheckpointManager(store, keep=2, rank=0, fingerprints={"model": "m"}, on_result=results.append)
    for step in (1, 2, 3):
        manager.save(step, model, optimizer, {"step": step}, asynchronous=False)
    assert [e["step"] for e in manager.catalogue] == manager.committed_steps() == [2, 3]
    times = [json.loads((tmp_path / f"step-{s:09d}" / MARKER).read_text())["time"] for s in (2, 3)]
    assert manager.catalogue == [{"step": s, "uri": store.child_uri(f"step-{s:09d}"), "time": t}
                                 for s, t in zip((2, 3), times, strict=True)]
    assert results[-1].committed_at == times[-1]
    restarted = CheckpointManager(store, keep=2, rank=0, fingerprints={"model": "m"})
    restarted.load_catalogue(3)  # a new run reads the same catalogue back from storage
    assert restarted.catalogue == manager.catalogue
    restarted.load_catalogue(2)  # resumed from 2 (3 was damaged): 3 is not listed
    assert [e["step"] for e in restarted.catalogue] == [2]
    restarted.load_catalogue(None)
    assert restarted.catalogue == []


# -- on S3 ----------------------------------------------------------------------------------------------


def test_two_writers_cannot_commit_the_same_step(s3: MotoServer, bucket: str, world_of_one: None) -> None:
    store = S3Store(f"s3://{bucket}/race/", S3Spec.model_validate(s3.s3_section()))
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(model.parameters())
    results: list[Any] = []
    first = CheckpointManager(store, 2, 0, {"model": "m"}, s3=store.spec, on_result=results.append)
    second = CheckpointManager(store, 2, 0, {"model": "m"}, s3=store.spec, on_result=results.append)
    first.save(7, model, opt, {"step": 7}, asynchronous=False)
    marker = store.get(f"step-000000007/{MARKER}")
    second.save(7, model, opt, {"step": 7}, asynchronous=False)
    assert [r.ok for r in results] == [True, False]
    assert "already committed by another writer" in (results[1].error or "")
    # the second writer knows it is not a storage failure: the run stops at its next save (Trainer.save)
    assert first.writer_conflict is None and second.writer_conflict is not None
    expected = f"another writer is saving checkpoints to s3://{bucket}/race/ (step 7 was committed by attempt a-"
    assert expected in second.writer_conflict
    assert store.get(f"step-000000007/{MARKER}") == marker
    assert first.latest() == 7


def test_an_object_changed_after_its_commit_is_never_loaded(s3: MotoServer, bucket: str, world_of_one: None,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = S3Store(f"s3://{bucket}/tamper/", S3Spec.model_validate(s3.s3_section()))
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights, 12 MiB with AdamW state: multipart, 2 objects
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    manager = CheckpointManager(store, 3, 0, {"model": "m"}, s3=store.spec)
    for step in (1, 2):
        manager.save(step, model, opt, {"step": step}, asynchronous=False)
    marker = json.loads(store.get(f"step-000000002/{MARKER}"))
    assert all(entry["checksum"].startswith("etag:") for entry in marker["files"].values())
    assert manager.latest() == 2
    # Another writer replaces one object of the newest checkpoint with different bytes of the same size:
    # the listing's sizes still match, its content does not.
    name = next(n for n, e in marker["files"].items() if n.endswith(".distcp.00000"))
    key = store.key(f"step-000000002/{name}")
    data = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    assert store.list(f"step-000000002/{name}") == {f"step-000000002/{name}": marker["files"][name]["size"]}
    with caplog.at_level("WARNING"):
        assert manager.latest() == 1
    assert f"checkpoint 2 is damaged ({name} has changed since it was committed" in caplog.text


def _trained_linear(size: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(size, size)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, size)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_retention_agrees_with_latest_and_never_deletes_a_newer_good_checkpoint(tmp_path: Path,
                                                                               world_of_one: None) -> None:
    """A damaged checkpoint numbered above the ones this run writes (latest() skips it) used to be the one
    keep=1 kept: every new commit was deleted right after it. Retention now counts intact checkpoints up to
    the one just committed; the start deletes the damaged newer one (Trainer._resume: discard_damaged)."""
    model, optimizer = _trained_linear()
    damaged = tmp_path / "step-000000100"
    damaged.mkdir()
    (damaged / MARKER).write_text(json.dumps({"step": 100, "attempt": "a-x", "files": {"a-x/data": 10}}))
    manager = CheckpointManager(LocalStore(tmp_path), keep=1, rank=0, fingerprints={"model": "m"})
    assert manager.latest() is None
    for step in (5, 6):
        manager.save(step, model, optimizer, {"step": step}, asynchronous=False)
        assert manager.latest() == step
    assert manager.committed_steps() == [6, 100]
    assert manager.latest() == 6 and manager.damaged == [100]
    manager.discard_damaged()
    assert manager.committed_steps() == [6] and not damaged.exists()
    # keep=2: a checkpoint damaged after its commit does not count as one of the two kept, and goes
    manager = CheckpointManager(LocalStore(tmp_path / "two"), keep=2, rank=0, fingerprints={"model": "m"})
    for step in (1, 2):
        manager.save(step, model, optimizer, {"step": step}, asynchronous=False)
    shard = next(p for p in (tmp_path / "two" / "step-000000002").rglob("*.distcp"))
    shard.unlink()
    manager.save(3, model, optimizer, {"step": 3}, asynchronous=False)
    assert manager.committed_steps() == [1, 3] and manager.latest() == 3


def _lose_first_response(client: Any, method: str, when: Callable[[dict[str, Any]], bool], times: int = 1) -> None:
    """S3 transport fault injection: the first `times` calls of `method` that `when` picks reach S3 and are
    carried out, then their response is lost (a read timeout), as on a dropped connection."""
    real = getattr(client, method)
    left = [times]

    def call(**kwargs: Any) -> Any:
        response = real(**kwargs)
        if left[0] and when(kwargs):
            left[0] -= 1
            raise ReadTimeoutError(endpoint_url="injected")
        return response

    setattr(client, method, call)


@pytest.mark.parametrize("attempts", [4, 1])
def test_a_commit_whose_response_was_lost_is_kept(s3: MotoServer, bucket: str, world_of_one: None,
                                                  attempts: int) -> None:
    """The exclusive COMMITTED put succeeds and its response is lost. Retried (4 attempts), the retry's 412 is
    recognised as this writer's own manifest: committed. Not retried (1 attempt), the save reports the error,
    but the attempt a stored manifest names is never discarded: still loadable."""
    store = S3Store(f"s3://{bucket}/lost-{attempts}/", S3Spec.model_validate(s3.s3_section(maxAttempts=attempts)))
    _lose_first_response(store.client, "put_object", lambda kw: "IfNoneMatch" in kw)
    model, optimizer = _trained_linear(32)
    results: list[Any] = []
    manager = CheckpointManager(store, 2, 0, {"model": "m"}, s3=store.spec, on_result=results.append)
    manager.save(3, model, optimizer, {"step": 3}, asynchronous=False)
    assert [r.ok for r in results] == [attempts > 1]
    assert manager.latest() == 3 and manager.load(3, model, optimizer) == {"step": 3}
    assert manager.writer_conflict is None


def _paginated(client: Any, page_size: int) -> None:
    """list_multipart_uploads in pages of `page_size`, as S3 gives 1000 at a time (moto ignores MaxUploads)."""
    real = client.list_multipart_uploads

    def page(KeyMarker: str = "", UploadIdMarker: str = "", **kwargs: Any) -> Any:
        uploads = sorted(real(**kwargs).get("Uploads", []), key=lambda u: (u["Key"], u["UploadId"]))
        rest = [u for u in uploads if (u["Key"], u["UploadId"]) > (KeyMarker, UploadIdMarker)]
        out: dict[str, Any] = {"Uploads": rest[:page_size], "IsTruncated": len(rest) > page_size}
        if out["IsTruncated"]:
            out.update(NextKeyMarker=rest[page_size - 1]["Key"], NextUploadIdMarker=rest[page_size - 1]["UploadId"])
        return out

    client.list_multipart_uploads = page


def test_clean_up_aborts_only_this_prefixs_checkpoint_uploads_on_every_page(s3: MotoServer, bucket: str) -> None:
    """A store at a bare bucket (which checkpoint.uri now refuses) or at a prefix aborts only the uploads of
    its own checkpoints, however many pages the listing takes; other teams' and the export's stay."""
    client = s3.client()
    client.create_bucket(Bucket="shared-uploads")
    mine = [f"job/step-00000000{i}/a-1/__0_0.distcp" for i in range(3)] + ["step-000000001/a-2/__0_0.distcp"]
    others = ["other-team/model.bin", "job2/step-000000001/a-1/x", "job/hf/model.safetensors"]
    for key in mine + others:
        client.create_multipart_upload(Bucket="shared-uploads", Key=key)
    with pytest.raises(ValueError, match=r"checkpoint\.uri: s3://shared-uploads names a whole bucket"):
        CheckpointSpec.model_validate({"uri": "s3://shared-uploads"})
    spec = S3Spec.model_validate(s3.s3_section())
    for uri, aborted in (("s3://shared-uploads/job/", mine[:3]), ("s3://shared-uploads", mine[3:])):
        store = S3Store(uri, spec)
        _paginated(store.client, 1)
        CheckpointManager(store, 2, 0, {"model": "m"}, s3=spec).clean_up_after_crash()
        left = incomplete_uploads(client, "shared-uploads")
        assert not set(aborted) & set(left) and set(others) <= set(left)


def test_a_storage_error_is_never_taken_for_a_damaged_checkpoint(s3: MotoServer, bucket: str,
                                                                world_of_one: None) -> None:
    """A read of the newest manifest times out: latest() raises (the start fails, retryably) instead of
    resuming from an older step, which the start would then take the newer one for damaged and delete."""
    store = S3Store(f"s3://{bucket}/flaky/", S3Spec.model_validate(s3.s3_section(maxAttempts=1)))
    model, optimizer = _trained_linear()
    manager = CheckpointManager(store, 3, 0, {"model": "m"}, s3=store.spec)
    for step in (1, 2):
        manager.save(step, model, optimizer, {"step": step}, asynchronous=False)
    _lose_first_response(store.client, "get_object", lambda kw: kw["Key"] == f"flaky/step-000000002/{MARKER}")
    with pytest.raises(ReadTimeoutError):
        manager.latest()
    assert manager.damaged == [] and manager.latest() == 2
