"""Checkpoints, data and exports on S3, against a real S3 HTTP server (moto_server on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from kubetrain_api.config import S3Spec
from kubetrain_trainer.checkpoint import MARKER, CheckpointManager
from kubetrain_trainer.s3_reader import S3Reader, coalesce_reads, split_ranges
from kubetrain_trainer.s3_writer import S3FileSystem, S3Writer, crc32_b64, object_key
from kubetrain_trainer.storage import AlreadyExists, LocalStore, S3Store
from support import job_manifest, training_spec, wait_for, write_manifest
from support.runs import KUBETRAIN, kill9_tree, read_events, step_losses, torchrun_cmd
from support.s3 import CREDENTIALS, SECRET, MotoServer, incomplete_uploads, objects

BUCKET = "kubetrain-test"
# Big enough (22 MB of weights and AdamW state) that saves are multipart and split into objects.
S3_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 688}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def world_of_one() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def spec_of(server: MotoServer, **extra: Any) -> S3Spec:
    return S3Spec.model_validate(server.s3_section(**extra))


def env() -> dict[str, str]:
    return {**os.environ, **CREDENTIALS, "OMP_NUM_THREADS": "1"}


# -- the storage layer --------------------------------------------------------------------------------

def test_store_exclusive_put_refuses_a_second_writer(s3: MotoServer, tmp_path: Path) -> None:
    for store in (S3Store(f"s3://{BUCKET}/excl/", spec_of(s3)), LocalStore(tmp_path)):
        store.put("a/COMMITTED", b"first", exclusive=True)
        with pytest.raises(AlreadyExists):
            store.put("a/COMMITTED", b"second", exclusive=True)
        assert store.get("a/COMMITTED") == b"first"
        assert store.list("a/") == {"a/COMMITTED": 5}


def test_streaming_upload_splits_objects_and_ranged_reads_return_the_bytes(s3: MotoServer) -> None:
    store = S3Store(f"s3://{BUCKET}/stream/", spec_of(s3, maxConcurrency=3))
    fs = S3FileSystem(store)
    payload = os.urandom(23 * 2**20 + 12345)
    # What the client really sends: every multipart upload declares CRC32 and every part carries the CRC32
    # of exactly its bytes (real S3 rejects a part whose bytes do not match; moto does not check).
    sent: list[tuple[str, Any]] = []
    store.client.meta.events.register("provide-client-params.s3.CreateMultipartUpload",
                                      lambda params, **_: sent.append(("create", params.get("ChecksumAlgorithm"))))
    store.client.meta.events.register("provide-client-params.s3.UploadPart", lambda params, **_: sent.append(
        ("part", params.get("ChecksumCRC32") == crc32_b64(params["Body"]) and len(params["Body"]))))
    store.client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: sent.append(
        ("put", params.get("ChecksumCRC32") == crc32_b64(params["Body"]) and len(params["Body"]))))
    with fs.create_stream("ckpt/__0_0.distcp", "wb") as stream:
        pos = 0
        for size in (1, 3 * 2**20, 7 * 2**20 + 5, 2**20, len(payload)):  # uneven writes
            stream.write(payload[pos : pos + size])
            pos = min(len(payload), pos + size)
        assert stream.tell() == len(payload)
    sizes = store.list("ckpt/")
    assert sizes == {"ckpt/__0_0.distcp.00000": 10 * 2**20, "ckpt/__0_0.distcp.00001": 10 * 2**20,
                     "ckpt/__0_0.distcp.00002": len(payload) - 20 * 2**20}
    assert fs.bytes_written == len(payload)
    for start, length in ((0, 10), (10 * 2**20 - 3, 7), (5, 21 * 2**20), (len(payload) - 100, 100)):
        gets = split_ranges(start, length, 10 * 2**20, 4 * 2**20)
        got = b"".join(store.get_range(object_key("ckpt/__0_0.distcp", i), within, n) for i, within, n in gets)
        assert got == payload[start : start + length]
    assert incomplete_uploads(s3.client(), BUCKET) == []
    # two 10 MiB objects of two 5 MiB parts each; the last object, shorter than a part, is one PUT
    assert [x for x in sent if x[0] != "part"] == [("create", "CRC32")] * 2 + [("put", 3 * 2**20 + 12345)]
    assert [x for x in sent if x[0] == "part"] == [("part", 5 * 2**20)] * 4
    assert crc32_b64(b"123456789") == "y/Q5Jg=="  # the CRC-32 check value 0xCBF43926, as S3 encodes it


def test_dcp_round_trip_through_s3_coalesces_tensor_reads(s3: MotoServer, world_of_one: None) -> None:
    # 5 MiB parts, 10 MiB objects: 60 tensors (~25 MB) written back to back into 3 objects; the load
    # must restore every byte with a few GETs of up to a part each, not one GET per tensor.
    store = S3Store(f"s3://{BUCKET}/coalesce/", spec_of(s3, maxConcurrency=4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(320, 320) for _ in range(30)])
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "extra": {"note": [1, 2, 3]}}
    total = sum(v.numel() * v.element_size() for v in state["model"].values())
    dcp.save(state, storage_writer=S3Writer(store, "ck"))
    assert incomplete_uploads(s3.client(), BUCKET) == []
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "extra": {"note": []}}
    reader = S3Reader(store, "ck", store.spec.object_size_bytes)
    dcp.load(target, storage_reader=reader)
    for key, value in state["model"].items():
        assert torch.equal(target["model"][key], value), key
    assert target["extra"] == {"note": [1, 2, 3]}
    most = -(-total // store.spec.part_size_bytes) + -(-total // store.spec.object_size_bytes) + 1
    assert 0 < reader.requests <= most < len(state["model"])


def test_coalesced_reads_cover_every_request_exactly_once() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5000), st.integers(1, 900)), max_size=40),
           st.integers(1, 2000), st.integers(0, 50))
    def check(ranges: list[tuple[str, int, int]], limit: int, gap: int) -> None:
        requests = [(name, off, n, i) for i, (name, off, n) in enumerate(ranges)]
        groups = coalesce_reads(requests, limit, gap)
        seen = []
        for g in groups:
            assert g.length <= limit or len(g.items) == 1
            for item, at, n in g.items:
                name, off, length, _ = requests[item]
                assert (name, off, length) == (g.name, g.start + at, n) and at + n <= g.length
                seen.append(item)
        assert sorted(seen) == list(range(len(requests)))
        for g in groups:  # the GETs cover the group without crossing an object or exceeding the limit
            gets = split_ranges(g.start, g.length, 700, limit)
            assert sum(n for _, _, n in gets) == g.length
            assert all(0 < n <= limit and within + n <= 700 for _, within, n in gets)
            starts = [i * 700 + w for i, w, _ in gets]
            assert starts == [g.start + sum(n for _, _, n in gets[:k]) for k in range(len(gets))]

    check()


def test_failed_stream_aborts_its_multipart_upload(s3: MotoServer) -> None:
    store = S3Store(f"s3://{BUCKET}/abort/", spec_of(s3))
    fs = S3FileSystem(store)
    with pytest.raises(RuntimeError, match="serialisation failed"), fs.create_stream("x/__0_0.distcp", "wb") as stream:
        stream.write(os.urandom(7 * 2**20))  # one part sent: the upload exists
        assert incomplete_uploads(s3.client(), BUCKET)
        raise RuntimeError("serialisation failed")
    assert incomplete_uploads(s3.client(), BUCKET) == []
    assert store.list("x/") == {}


def test_two_writers_cannot_commit_the_same_step(s3: MotoServer, world_of_one: None) -> None:
    store = S3Store(f"s3://{BUCKET}/race/", spec_of(s3))
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
    assert store.get(f"step-000000007/{MARKER}") == marker
    assert first.latest() == 7


def test_an_object_changed_after_its_commit_is_never_loaded(s3: MotoServer, world_of_one: None,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = S3Store(f"s3://{BUCKET}/tamper/", spec_of(s3))
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
    data = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    assert store.list(f"step-000000002/{name}") == {f"step-000000002/{name}": marker["files"][name]["size"]}
    with caplog.at_level("WARNING"):
        assert manager.latest() == 1
    assert f"checkpoint 2 is damaged ({name} has changed since it was committed" in caplog.text


# -- training against S3 --------------------------------------------------------------------------------

def _config(tmp_path: Path, prepared: Path, s3: MotoServer, prefix: str, name: str, **training: Any) -> Path:
    spec = job_manifest(spec=training_spec(prepared), model={"config": S3_MODEL},
                        training={"evalEvery": 0, "globalBatchSize": 8, **training},
                        checkpoint={"uri": f"s3://{BUCKET}/{prefix}/", "everySteps": 10, "keep": 3},
                        s3=s3.s3_section())["spec"]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({k: spec[k] for k in ("model", "tokenizer", "data", "training", "checkpoint",
                                                     "metrics", "s3")}))
    return path


def _train(nproc: int, config: Path, output: Path) -> None:
    result = subprocess.run(torchrun_cmd(nproc, config, output), env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_kill9_mid_upload_resumes_exactly_from_the_previous_commit(s3: MotoServer, prepared: Path,
                                                                    tmp_path: Path) -> None:
    client = s3.client()
    reference = _config(tmp_path, prepared, s3, "kill-ref", "ref", maxSteps=30)
    _train(2, reference, tmp_path / "ref")
    config = _config(tmp_path, prepared, s3, "kill", "kill", maxSteps=30)
    slow = json.loads(config.read_text())
    slow["s3"]["maxConcurrency"] = 1  # parts one at a time: the upload stays in flight long enough to be hit
    config.write_text(json.dumps(slow))
    proc = subprocess.Popen(torchrun_cmd(2, config, tmp_path / "kill"), env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any("kill/step-000000020/" in k for k in incomplete_uploads(client, BUCKET)), timeout=180,
             what="the step-20 upload in flight")
    kill9_tree(proc.pid)
    proc.wait()
    keys = objects(client, BUCKET, "kill/")
    assert [k for k in keys if k.endswith(MARKER)] == [f"kill/step-000000010/{MARKER}"]
    assert incomplete_uploads(client, BUCKET)  # the dead writer could not abort its upload

    _train(2, config, tmp_path / "kill")
    assert [s["startStep"] for s in read_events(tmp_path / "kill", "start")] == [0, 10]
    assert incomplete_uploads(client, BUCKET) == []  # aborted on restart, and nothing new left behind
    ref, resumed = step_losses(tmp_path / "ref"), step_losses(tmp_path / "kill")
    assert [resumed[s] for s in range(11, 31)] == [ref[s] for s in range(11, 31)]
    committed = sorted(k for k in objects(client, BUCKET, "kill/") if k.endswith(MARKER))
    assert committed == [f"kill/step-0000000{n}/{MARKER}" for n in (10, 20, 30)]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resharding_resume_with_another_world_size(s3: MotoServer, prepared: Path, tmp_path: Path,
                                                   before: int, after: int) -> None:
    """FSDP2-sharded state saved by N processes at a SIGTERM loads into M, and training goes on exactly as an
    uninterrupted run: same batches (the sampler ignores the world size), same schedule, same AdamW state."""
    steps, client = 30, s3.client()
    reference = _config(tmp_path, prepared, s3, f"reshard-ref-{before}{after}", "ref", maxSteps=steps,
                        parallelism="fsdp")
    _train(2, reference, tmp_path / "ref")
    config = _config(tmp_path, prepared, s3, f"reshard-{before}{after}", "run", maxSteps=steps, parallelism="fsdp")
    cmd = torchrun_cmd(before, config, tmp_path / "run")
    cmd.insert(cmd.index("--max-restarts=0"), "--shutdown-timeout=60")  # time for the SIGTERM checkpoint
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: f"reshard-{before}{after}/step-000000010/{MARKER}" in objects(client, BUCKET,
                                                                                  f"reshard-{before}{after}/"),
             timeout=240, what="the step-10 commit")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    preempted = read_events(tmp_path / "run", "preempted")[-1]["step"]
    assert 10 <= preempted < steps
    assert f"reshard-{before}{after}/step-{preempted:09d}/{MARKER}" in objects(client, BUCKET, "reshard-")

    _train(after, config, tmp_path / "run")
    starts = read_events(tmp_path / "run", "start")
    assert [(s["worldSize"], s["startStep"]) for s in starts] == [(before, 0), (after, preempted)]
    ref, run = step_losses(tmp_path / "ref"), step_losses(tmp_path / "run")
    resumed = range(preempted + 1, steps + 1)
    # Equal up to float rounding: the ranks reduce gradients in another order. Losing the AdamW moments or
    # a shifted schedule or data order moves the loss by far more than this.
    assert max(abs(run[s] - ref[s]) for s in resumed) < 2e-3, [(run[s], ref[s]) for s in resumed]


def test_s3_outage_during_an_upload_fails_cleanly_and_training_goes_on(s3: MotoServer, prepared: Path,
                                                                         tmp_path: Path) -> None:
    config = _config(tmp_path, prepared, s3, "outage", "outage", maxSteps=80)
    cfg = json.loads(config.read_text())
    cfg["s3"].update(maxConcurrency=1, maxAttempts=3)
    cfg["checkpoint"]["everySteps"] = 10
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(torchrun_cmd(2, config, out), env=env(), start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT)
    client = s3.client()
    wait_for(lambda: any("outage/step-" in k for k in incomplete_uploads(client, BUCKET)), timeout=180,
             what="an upload in flight")
    s3.stop()
    steps_at_stop = len(read_events(out, "step"))
    wait_for(lambda: len(read_events(out, "step")) >= steps_at_stop + 3, what="training to go on during the outage")
    s3.start()
    s3.client().create_bucket(Bucket=BUCKET)  # moto forgets everything when it stops
    proc.wait(timeout=600)
    output = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, f"exit code {proc.returncode}: {output[-3000:]}"
    assert SECRET not in output
    failed = read_events(out, "checkpoint_failed")
    committed = [e["step"] for e in read_events(out, "checkpoint")]
    assert failed, "the upload interrupted by the outage should have failed"
    assert all(e["error"] and SECRET not in e["error"] for e in failed)
    assert committed and committed[-1] == 80 and max(e["step"] for e in failed) < 80
    assert f"outage/step-000000080/{MARKER}" in objects(s3.client(), BUCKET, "outage/")


def test_failing_saves_stop_the_job_after_max_consecutive_failures(s3: MotoServer, prepared: Path,
                                                                    tmp_path: Path) -> None:
    client = s3.client()
    client.create_bucket(Bucket="fragile")
    config = _config(tmp_path, prepared, s3, "x", "fragile", maxSteps=200)
    cfg = json.loads(config.read_text())
    cfg["checkpoint"].update(uri="s3://fragile/job/", everySteps=3, maxConsecutiveFailures=2)
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(torchrun_cmd(2, config, out), env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(lambda: read_events(out, "checkpoint"), timeout=180, what="a first committed checkpoint")
    for key in objects(client, "fragile"):
        client.delete_object(Bucket="fragile", Key=key)
    client.delete_bucket(Bucket="fragile")  # every later save fails: NoSuchBucket
    proc.wait(timeout=300)
    failures = read_events(out, "checkpoint_failed")
    error = read_events(out, "error")[-1]
    assert proc.returncode != 0 and len(failures) >= 2, (tmp_path / "train.log").read_text()[-3000:]
    assert error["exitCode"] == 4 and "checkpoint saves in a row failed" in error["message"]
    assert "NoSuchBucket" in failures[0]["error"] and SECRET not in json.dumps(failures)


def test_unreachable_checkpoint_store_is_a_clear_error(s3: MotoServer, prepared: Path, tmp_path: Path) -> None:
    manifest = job_manifest(spec=training_spec(prepared), checkpoint={"uri": "s3://no-such-bucket/x/"},
                            s3=s3.s3_section())
    path = write_manifest(tmp_path / "job.yaml", manifest)
    result = subprocess.run([*KUBETRAIN, "run", str(path), "--output", str(tmp_path / "out")], env=env(),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "checkpoint.uri: cannot list s3://no-such-bucket/x/" in result.stderr and "NoSuchBucket" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr


def test_run_from_s3_data_to_s3_checkpoints_with_preemption_export_and_no_leaked_secret(
        s3: MotoServer, small_corpus: Path, tmp_path: Path) -> None:
    cli_env = {**env(), "AWS_ENDPOINT_URL_S3": s3.endpoint}
    prep = subprocess.run([*KUBETRAIN, "prepare", "--input", str(small_corpus), "--train-tokenizer", "512",
                           "--validation-split", "0.2", "--output", f"s3://{BUCKET}/data/"],
                          env=cli_env, capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    assert "data/train/index.json" in objects(s3.client(), BUCKET, "data/")
    manifest = job_manifest(spec=training_spec(tmp_path), model={"config": S3_MODEL},
                            tokenizer={"path": f"s3://{BUCKET}/data/tokenizer/"},
                            data={"train": f"s3://{BUCKET}/data/train/", "validation": f"s3://{BUCKET}/data/validation/"},
                            training={"maxSteps": 400, "evalEvery": 0},
                            checkpoint={"uri": f"s3://{BUCKET}/job/", "everySteps": 4, "keep": 2, "exportHF": True},
                            workers={"procPerNode": 2}, s3=s3.s3_section())
    path = write_manifest(tmp_path / "job.yaml", manifest)
    out = tmp_path / "out"
    proc = subprocess.Popen([*KUBETRAIN, "run", str(path), "--output", str(out)], env=cli_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for(lambda: len(read_events(out, "checkpoint")) >= 3, timeout=240, what="three committed checkpoints")
    port = read_events(out, "start")[0]["metricsPort"]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    progress = urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5).read().decode()
    assert "kubetrain_checkpoint_blocked_seconds_count" in scraped and json.loads(progress)["checkpoint"]
    proc.send_signal(__import__("signal").SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    preempted = read_events(out, "preempted")[-1]["step"]
    keys = objects(s3.client(), BUCKET, "job/")
    assert f"job/step-{preempted:09d}/{MARKER}" in keys
    steps = sorted({k.split("/")[1] for k in keys if k.startswith("job/step-")})
    assert len(steps) == 2 and steps[-1] == f"step-{preempted:09d}"  # retention: keep 2, nothing partial

    path.write_text(path.read_text().replace("maxSteps: 400", f"maxSteps: {preempted + 4}"))
    result = subprocess.run([*KUBETRAIN, "run", str(path), "--output", str(out)], env=cli_env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert read_events(out, "start")[-1]["startStep"] == preempted

    download = tmp_path / "downloaded"
    client = s3.client()
    for key in objects(client, BUCKET, "job/hf/"):
        target = download / key.removeprefix("job/hf/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(download)
    tok = AutoTokenizer.from_pretrained(download)
    assert model.config.hidden_size == 256 and len(tok) == 512

    texts = [stdout, stderr, result.stdout, result.stderr, scraped, progress, path.read_text()]
    texts += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in
              (".log", ".jsonl", ".json", ".yaml", ".txt")]
    assert not any(SECRET in t for t in texts)
