"""The measurement: the model and the server set up once, an untimed warm-up, then the repeats, each
printed as it finishes."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import BUCKET, CREDENTIALS, MB
from .contenders import Probe, build, delete_prefix, download_then_load, sync_save_then_upload, upload_split
from .server import Meter, Moto, machine, wait_for_quiet


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    os.environ.update(CREDENTIALS)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; torch {info['torch']}, "
          f"boto3 {info['boto3']}, moto {info['moto']}; code {info['code']}", flush=True)
    cfg, model, optimizer, params, state_bytes = _build(args.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    work = Path(tempfile.mkdtemp(prefix="kubetrain-bench-ckpt-", dir=args.tmp))
    server = Moto(work)
    results: dict[str, Any] = {"machine": info, "parameters": params, "state_bytes": state_bytes,
                               "settings": {}, "repeats": []}
    try:
        server.start()
        results["moto_server"] = server.exe
        print(f"server: {server.exe} on {server.endpoint} (TMPDIR {server.workdir / 'tmp'})", flush=True)
        contest = _set_up(args, cfg, model, optimizer, server, work, results)
        _quiet_and_warm(args, contest, results)
        t_all = time.perf_counter()
        for r in range(args.repeats):
            rep = contest.repeat(r)
            print(describe_repeat(rep, r, args.repeats), flush=True)
            results["repeats"].append(rep)
        results["measure_seconds"] = time.perf_counter() - t_all
        results["moto_peak_rss_gb"] = server.peak_rss_gb()
        results["leftover_uploads"] = len(contest.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    return results


def _build(threads: int) -> tuple[Any, Any, Any, int, int]:
    """The model after one step (so the AdamW state exists), its parameters and its state's bytes."""
    import torch
    from kubetrain_trainer.model import model_cost

    t_build = time.perf_counter()
    cfg, model, optimizer = build(threads)
    params = model_cost(cfg, 512).parameters
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                       if isinstance(v, torch.Tensor))
    print(f"model: llama-125m, vocab 32000: {params / 1e6:.1f}M parameters, model + AdamW state "
          f"{state_bytes / 1e9:.2f} GB (built in {time.perf_counter() - t_build:.1f}s)", flush=True)
    return cfg, model, optimizer, params, state_bytes


@dataclass
class Contest:
    """Everything the repeats share: one model, one server, one client configuration for both contenders."""

    model: Any
    optimizer: Any
    server: Moto
    work: Path
    client: Any
    transfer: Any  # the baselines' boto3 TransferConfig
    manager: Any  # kubetrain's CheckpointManager
    probe: Probe
    object_size: int

    def repeat(self, r: int) -> dict[str, Any]:
        rep: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
        step = r + 1
        # The contenders take turns going first (ABBA), so neither always meets the server in the
        # state the other left it in.
        rep["order"] = ["kubetrain", "baselines"] if r % 2 == 0 else ["baselines", "kubetrain"]
        for phase in rep["order"]:
            if phase == "kubetrain":
                self.save_kubetrain(rep, step)
            else:
                self.save_baselines(rep, r)
        self.load_both(rep, r, step)
        rep["moto_rss_gb"] = self.server.rss_gb()
        return rep

    def save_kubetrain(self, rep: dict[str, Any], step: int) -> None:
        """(1a) kubetrain: asynchronous streaming save."""
        with Meter(self.server) as m:
            blocked = self.manager.save(step, self.model, self.optimizer, {"step": step}, asynchronous=True)
            res = self.manager.wait()
        assert res is not None and res.ok, res
        rep["async"] = {"blocked": blocked, "total": res.total_seconds, "bytes": res.bytes_written,
                        "write": res.total_seconds - res.blocked_seconds, "foreign": m.foreign_share,
                        "server_cpu": m.server_cpu}

    def save_baselines(self, rep: dict[str, Any], r: int) -> None:
        """(1b) synchronous local save, then upload_file; (1c) the same bytes in kubetrain's object sizes
        through one TransferManager. The sync objects stay for the download baseline."""
        local = self.work / f"sync-{r}"
        with Meter(self.server) as m:
            rep["sync"] = sync_save_then_upload(self.model, self.optimizer, local, self.client, f"baseline/{r}/",
                                                self.transfer)
        rep["sync"].update(foreign=m.foreign_share, server_cpu=m.server_cpu)
        with Meter(self.server) as m:
            rep["split"] = upload_split(local, self.work, self.client, f"split/{r}/", self.transfer, self.object_size)
        rep["split"].update(foreign=m.foreign_share, server_cpu=m.server_cpu)
        shutil.rmtree(local)
        delete_prefix(self.client, f"split/{r}/")

    def load_both(self, rep: dict[str, Any], r: int, step: int) -> None:
        """(3a) kubetrain's load with ranged reads; (3b) the baseline: download, then load. Each one's
        restored state is checked against the probe."""
        self.probe.clobber()
        with Meter(self.server) as m:
            self.manager.load(step, self.model, self.optimizer)
        self.probe.check("CheckpointManager.load")
        rep["load"] = {"total": m.seconds, "foreign": m.foreign_share}
        self.probe.clobber()
        dl = self.work / f"download-{r}"
        with Meter(self.server) as m:
            rep["dl_load"] = download_then_load(self.model, self.optimizer, dl, self.client, f"baseline/{r}/",
                                                self.transfer)
        self.probe.check("download-then-load")
        rep["dl_load"]["foreign"] = m.foreign_share
        shutil.rmtree(dl)
        delete_prefix(self.client, f"baseline/{r}/")


def _set_up(args: argparse.Namespace, cfg: Any, model: Any, optimizer: Any, server: Moto, work: Path,
            results: dict[str, Any]) -> Contest:
    """The S3 settings, the bucket, kubetrain's CheckpointManager (buffers prepared) and the baselines' config."""
    from boto3.s3.transfer import TransferConfig
    from kubetrain_api.config import S3Spec
    from kubetrain_trainer.checkpoint import CheckpointManager
    from kubetrain_trainer.model import model_fingerprint
    from kubetrain_trainer.storage import S3Store, s3_client

    spec = S3Spec(endpoint=server.endpoint, region="us-east-1", addressing_style="path",
                  part_size_bytes=args.part_mib * 2**20, object_size_bytes=args.object_mib * 2**20,
                  max_concurrency=args.concurrency)
    results["settings"] = {"part_size_mib": args.part_mib, "object_size_mib": args.object_mib,
                           "max_concurrency": args.concurrency, "threads": args.threads,
                           "baseline_part_size_mib": args.baseline_part_mib or args.part_mib}
    client = s3_client(spec)  # the same client configuration kubetrain uses, for both contenders
    client.create_bucket(Bucket=BUCKET)
    baseline_part = (args.baseline_part_mib or args.part_mib) * 2**20
    transfer = TransferConfig(multipart_chunksize=baseline_part, max_concurrency=spec.max_concurrency)
    manager = CheckpointManager(S3Store(f"s3://{BUCKET}/async/", spec), keep=1, rank=0,
                                fingerprints={"model": model_fingerprint(cfg)}, s3=spec)
    probe = Probe(model, optimizer)
    # As the trainer does after its first step: host staging buffers are allocated (and touched) in a
    # background thread long before the first save; here we wait for it, outside the measurements.
    t_prep = time.perf_counter()
    manager.prepare(model, optimizer)
    if manager._preparing is not None:
        manager._preparing.join()
    results["prepare_seconds"] = time.perf_counter() - t_prep
    print(f"staging buffers prepared in the background in {results['prepare_seconds']:.2f}s", flush=True)
    return Contest(model, optimizer, server, work, client, transfer, manager, probe, spec.object_size_bytes)


def _quiet_and_warm(args: argparse.Namespace, contest: Contest, results: dict[str, Any]) -> None:
    """Wait for a quiet machine, then one untimed upload: the first upload into a fresh moto_server is slower
    for anyone (its heap grows), so no contender measures the server's start."""
    load0 = wait_for_quiet(args.max_load, args.max_wait)
    results["loadavg_before"] = load0
    baseline_part = (args.baseline_part_mib or args.part_mib) * 2**20
    print(f"measuring under 1-minute load {load0:.2f}; S3: part {args.part_mib} MiB, object "
          f"{args.object_mib} MiB, max_concurrency {args.concurrency}; baseline TransferConfig: part "
          f"{baseline_part // 2**20} MiB, max_concurrency {args.concurrency}\n", flush=True)
    t_warm = time.perf_counter()
    warm = contest.work / "warm-up"
    sync_save_then_upload(contest.model, contest.optimizer, warm, contest.client, "warm-up/", contest.transfer)
    shutil.rmtree(warm)
    delete_prefix(contest.client, "warm-up/")
    print(f"warm-up upload (untimed) {time.perf_counter() - t_warm:.1f}s", flush=True)


def describe_repeat(rep: dict[str, Any], r: int, repeats: int) -> str:
    a, s, sp, ld, dll = rep["async"], rep["sync"], rep["split"], rep["load"], rep["dl_load"]
    return (f"repeat {r + 1}/{repeats} (load {rep['loadavg']:.2f}, moto RSS {rep['moto_rss_gb']:.1f} GB; "
            f"{' first, then '.join(rep['order'])}):\n"
            f"  async   blocked {a['blocked']:.3f}s  total {a['total']:.2f}s  write "
            f"{a['bytes'] / MB / a['write']:.1f} MB/s  ({a['bytes'] / 1e9:.3f} GB; server CPU "
            f"{a['server_cpu']:.1f}s; other load {a['foreign']:.0%})\n"
            f"  sync    blocked {s['blocked']:.2f}s = local dcp.save {s['local_save']:.2f}s + upload_file "
            f"{s['upload']:.2f}s  ({s['bytes'] / MB / s['upload']:.1f} MB/s; server CPU {s['server_cpu']:.1f}s; "
            f"other load {s['foreign']:.0%})\n"
            f"  split   TransferManager of {sp['objects']} objects {sp['upload']:.2f}s  "
            f"({sp['bytes'] / MB / sp['upload']:.1f} MB/s; server CPU "
            f"{sp['server_cpu']:.1f}s; other load {sp['foreign']:.0%})\n"
            f"  load    {ld['total']:.2f}s  (ranged reads; other load {ld['foreign']:.0%})\n"
            f"  dl+load {dll['total']:.2f}s = download_file {dll['download']:.2f}s + local dcp.load "
            f"{dll['local_load']:.2f}s  (other load {dll['foreign']:.0%})")
