"""The contenders' parts: the model being checkpointed, the two upload baselines and the download baseline,
and the probe that checks a load really restored the state."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from . import BUCKET


def build(threads: int) -> tuple[Any, Any, Any]:
    import torch
    from kubetrain_api.config import ModelSpec, TrainingSpec
    from kubetrain_trainer.model import build_model, llama_config
    from kubetrain_trainer.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = llama_config(ModelSpec(preset="llama-125m"), 32000, 512)
    model = build_model(cfg, "cpu", seed=0)
    optimizer = build_optimizer(model, TrainingSpec(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (1, 16), generator=gen)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cfg, model, optimizer


def state_of(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def sync_save_then_upload(model: Any, optimizer: Any, local: Path, client: Any, key_prefix: str,
                          transfer: Any) -> dict[str, float]:
    """The baseline: training is blocked for the local DCP save and the upload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    t0 = time.perf_counter()
    dcp.save(state_of(model, optimizer), storage_writer=FileSystemWriter(str(local)))
    t1 = time.perf_counter()
    nbytes = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, key_prefix + str(path.relative_to(local)), Config=transfer)
        nbytes += path.stat().st_size
    t2 = time.perf_counter()
    return {"blocked": t2 - t0, "local_save": t1 - t0, "upload": t2 - t1, "bytes": nbytes}


def upload_split(local: Path, work: Path, client: Any, key_prefix: str, transfer: Any,
                 object_size: int) -> dict[str, float]:
    """A second upload baseline with kubetrain's object sizes: the same bytes cut (untimed) into files of
    `object_size`, all handed at once to one boto3 TransferManager (same part size and concurrency), so
    its pool never drains between objects and the server assembles objects as small as kubetrain's."""
    from boto3.s3.transfer import create_transfer_manager

    chunks = work / "chunks"
    chunks.mkdir()
    files = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with path.open("rb") as src:
            index = 0
            while block := src.read(object_size):
                target = chunks / f"{path.name}.{index:05d}"
                target.write_bytes(block)
                files.append(target)
                index += 1
    nbytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    with create_transfer_manager(client, transfer) as manager:
        futures = [manager.upload(str(f), BUCKET, key_prefix + f.name) for f in files]
        for future in futures:
            future.result()
    seconds = time.perf_counter() - t0
    shutil.rmtree(chunks)
    return {"upload": seconds, "bytes": nbytes, "objects": len(files)}


def download_then_load(model: Any, optimizer: Any, local: Path, client: Any, key_prefix: str,
                       transfer: Any) -> dict[str, float]:
    """The baseline resume: download every object, then load from the local directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    t0 = time.perf_counter()
    nbytes = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            target = local / obj["Key"][len(key_prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, obj["Key"], str(target), Config=transfer)
            nbytes += obj["Size"]
    t1 = time.perf_counter()
    state = state_of(model, optimizer)
    dcp.load(state, storage_reader=FileSystemReader(str(local)))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    t2 = time.perf_counter()
    return {"total": t2 - t0, "download": t1 - t0, "local_load": t2 - t1, "bytes": nbytes}


class Probe:
    """Overwrite a weight and its AdamW moments before a load, check the load put them back."""

    def __init__(self, model: Any, optimizer: Any):
        self.param = model.model.layers[5].mlp.down_proj.weight
        self.state = optimizer.state[self.param]
        self.ref = {"w": self.param.detach().clone(), "m": self.state["exp_avg"].clone(),
                    "v": self.state["exp_avg_sq"].clone()}

    def clobber(self) -> None:
        import torch

        with torch.no_grad():
            self.param.zero_()
        self.state["exp_avg"].fill_(1.0)
        self.state["exp_avg_sq"].fill_(1.0)

    def check(self, what: str) -> None:
        import torch

        got = {"w": self.param.detach(), "m": self.state["exp_avg"], "v": self.state["exp_avg_sq"]}
        for k, ref in self.ref.items():
            if not torch.equal(got[k], ref):
                raise AssertionError(f"{what}: {k} of layers.5.mlp.down_proj was not restored")


def delete_prefix(client: Any, prefix: str) -> None:
    objs = [{"Key": o["Key"]} for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    if objs:
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": objs})
