"""The training process (one per device, launched by torchrun): `python -m kubetrain_trainer.train`.

Inputs are a trainer config whose data paths are prepared shard directories and whose tokenizer is
a saved tokenizer; the launcher (`kubetrain run`) or a cluster init step prepares them.
Outputs under --output: events.jsonl (rank 0's step/eval/checkpoint log), results.json, model/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import CheckpointManager, SaveResult, full_state_dict
from .config import TrainerConfig
from .errors import EXIT_PREEMPTED, CheckpointFailedError, ConfigError, NonFiniteError
from .metrics import MetricsServer, ProgressState, TrainingMetrics, device_peak_flops
from .model import build_model, llama_config, model_cost, model_fingerprint
from .optim import build_optimizer, lr_at
from .parallelize import choose_parallelism, no_sync, parallelize
from .sampler import eval_micro_batches, rank_micro_batches
from .shards import TokenShards
from .storage import S3Store, local_copy, open_store
from .tokenizer import load_tokenizer, tokenizer_fingerprint

log = logging.getLogger("kubetrain.train")


class Events:
    """Rank 0's append-only JSON-lines log: the launcher's progress bar and summary read it."""

    def __init__(self, path: Path | None):
        self._fh = path.open("a", buffering=1) if path else None

    def emit(self, kind: str, **fields: Any) -> None:
        if self._fh:
            self._fh.write(json.dumps({"type": kind, "time": time.time(), **fields}) + "\n")


class Preemption:
    """SIGTERM sets a flag; the loop finishes its step, all ranks agree, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        self.received_at = 0.0
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.received_at = time.monotonic()
        self.requested = True


def init_distributed() -> tuple[int, int, int, torch.device]:
    if "RANK" not in os.environ:  # a plain `python -m` run: a world of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local, device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenShards, n_eval: int, micro: int, rank: int, world: int,
             device: torch.device, autocast: Any) -> float:
    """Mean token loss over the first n_eval validation sequences, independent of the world size.
    Every rank runs the same number of forward passes (FSDP needs that); padding rows weigh 0."""
    model.eval()
    batches = eval_micro_batches(n_eval, micro, rank, world)
    passes = math.ceil(math.ceil(n_eval / world) / micro)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in range(passes):
        idx = batches[i] if i < len(batches) else np.zeros(0, dtype=np.int64)
        real = len(idx)
        padded = np.concatenate([idx, np.zeros(micro - real, dtype=np.int64)]) if real < micro else idx
        batch = data.batch(padded).to(device, non_blocking=True)
        with autocast():
            logits = model(input_ids=batch[:, :-1]).logits
        losses = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        total += losses.view(micro, -1)[:real].double().sum()
        count += real * data.seq_length
    model.train()
    s, c = all_sum([total.item(), float(count)], device)
    return s / c


def train(cfg: TrainerConfig, output: Path) -> dict[str, Any]:
    rank, world, local_rank, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    ts = cfg.training
    if (problem := ts.batch_layout_error(world)) is not None:
        raise ConfigError(problem)
    events = Events(output / "events.jsonl" if rank == 0 else None)
    preemption = Preemption()

    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: the trainer needs a prepared tokenizer; run it through `kubetrain run`")
    tokenizer = load_tokenizer(local_copy(cfg.tokenizer.path, output / "tokenizer-download", cfg.s3,
                                          "tokenizer.path"))
    train_data = TokenShards(cfg.data.train, cfg.data.seq_length, "data.train", s3=cfg.s3)
    if cfg.data.validation is None:
        raise ConfigError("data.validation: the trainer needs prepared validation shards")
    val_data = TokenShards(cfg.data.validation, cfg.data.seq_length, "data.validation", s3=cfg.s3)
    tok_fp = tokenizer_fingerprint(tokenizer)
    for name, shards in (("data.train", train_data), ("data.validation", val_data)):
        if shards.tokenizer_fingerprint != tok_fp:
            raise ConfigError(f"{name}: shards in {shards.root} were tokenised with another tokenizer "
                              f"({shards.tokenizer_fingerprint} != {tok_fp}); prepare them again")
    if len(train_data) < ts.global_batch_size:
        raise ConfigError(f"data.train holds {len(train_data)} sequences of {cfg.data.seq_length} tokens, fewer "
                          f"than training.globalBatchSize ({ts.global_batch_size}); add data or lower either")
    if len(val_data) == 0:
        raise ConfigError(f"data.validation holds no full sequence of {cfg.data.seq_length} tokens; raise "
                          f"data.validationSplit or give more validation data")

    mcfg = llama_config(cfg.model, len(tokenizer), cfg.data.seq_length)
    cost = model_cost(mcfg, cfg.data.seq_length)
    model = build_model(mcfg, device, seed=ts.seed)
    if cfg.model.init_from:
        from transformers import LlamaForCausalLM

        try:
            src = LlamaForCausalLM.from_pretrained(cfg.model.init_from, torch_dtype=torch.float32)
            model.load_state_dict(src.state_dict())
        except Exception as exc:
            raise ConfigError(f"model.initFrom: cannot load {cfg.model.init_from} into this model "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    parallelism = choose_parallelism(ts, world, cost.parameters, device)
    fwd, layout = parallelize(model, ts, parallelism, device)
    optimizer = build_optimizer(model, ts, device)

    metrics = TrainingMetrics()
    progress = ProgressState(ts.max_steps) if rank == 0 else None
    server = MetricsServer(metrics, progress, cfg.metrics.port) if local_rank == 0 else None
    metrics.parameters.set(cost.parameters)
    metrics.flops_per_token.set(cost.flops_per_token)
    metrics.max_steps.set(ts.max_steps)
    metrics.world_size.set(world)
    peak = cfg.metrics.peak_flops or device_peak_flops(device, layout.dtype)
    # Every rank measured its own peak on CPU; use the mean so MFU is the same number everywhere.
    peak = all_sum([peak], device)[0] / world

    ckpt_uri = cfg.checkpoint.uri or str(output / "checkpoints")
    store = open_store(ckpt_uri, cfg.s3)
    committed: dict[str, Any] = {"step": None, "failures": 0}

    def on_save_result(result: SaveResult) -> None:  # runs in the checkpoint thread when a save ends
        metrics.checkpoint_seconds.observe(result.total_seconds)
        metrics.checkpoint_bytes.inc(result.bytes_written)
        if result.total_seconds > 0:
            metrics.checkpoint_throughput.set(result.bytes_written / result.total_seconds)
        if result.ok:
            committed["step"] = result.step
            metrics.checkpoint_step.set(result.step)
            info = {"step": result.step, "uri": store.child_uri(f"step-{result.step:09d}"), "time": time.time()}
            if progress:
                progress.update(checkpoint=info, checkpointFailures=committed["failures"])
            events.emit("checkpoint", step=result.step, seconds=result.total_seconds,
                        blockedSeconds=result.blocked_seconds, bytes=result.bytes_written, path=info["uri"])
            log.info("checkpoint step %d committed: %.2fs in all, %.3fs blocking, %.1f MB", result.step,
                     result.total_seconds, result.blocked_seconds, result.bytes_written / 1e6)
        else:
            committed["failures"] += 1
            metrics.checkpoint_failures.inc()
            if progress:
                progress.update(checkpointFailures=committed["failures"], lastCheckpointError=result.error)
            events.emit("checkpoint_failed", step=result.step, error=result.error)

    manager = CheckpointManager(store, cfg.checkpoint.keep, rank,
                                {"model": model_fingerprint(mcfg), "tokenizer": tok_fp}, s3=cfg.s3,
                                process_group=dist.new_group(backend="gloo"), on_result=on_save_result)
    latest_box: list[Any] = [None]
    if rank == 0:
        try:
            manager.clean_up_after_crash()
            latest_box[0] = manager.latest()
        except Exception as exc:
            latest_box[0] = ConfigError(f"checkpoint.uri: cannot read {store.uri} ({type(exc).__name__}: "
                                        f"{str(exc)[:200]}); check the bucket, s3.endpoint and the credentials")
    dist.broadcast_object_list(latest_box, src=0)  # every rank resumes from the same step
    if isinstance(latest_box[0], ConfigError):
        raise latest_box[0]
    latest = latest_box[0]
    state: dict[str, Any] = {"step": 0, "trainLoss": [], "evals": [], "elapsedSeconds": 0.0, "tokens": 0}
    if latest is not None:
        state = manager.load(latest, model, optimizer)
        log.info("resumed from %s at step %d", store.child_uri(f"step-{latest:09d}"), latest)
    start_step = state["step"]
    committed["step"] = latest
    if latest is not None:
        metrics.checkpoint_step.set(latest)
    tokens_per_step = ts.global_batch_size * cfg.data.seq_length
    n_eval = min(len(val_data), ts.eval_batches * ts.global_batch_size)
    accum = ts.global_batch_size // world // ts.micro_batch_size
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    info = {"rank": rank, "worldSize": world, "parallelism": layout.parallelism, "dtype": str(layout.dtype),
            "device": device.type, "threads": torch.get_num_threads(), "peakFlops": peak,
            "trainSequences": len(train_data), "validationSequences": len(val_data), "evalSequences": n_eval,
            "gradientAccumulation": accum, "startStep": start_step, "metricsPort": server.port if server else None,
            **cost.to_dict()}
    events.emit("start", **info)
    log.info("start %s", json.dumps(info))

    def run_eval(step: int) -> float:
        loss = evaluate(fwd, val_data, n_eval, ts.micro_batch_size, rank, world, device, layout.autocast)
        state["evals"].append({"step": step, "loss": loss, "perplexity": math.exp(min(loss, 50.0))})
        metrics.eval_loss.set(loss)
        metrics.eval_perplexity.set(math.exp(min(loss, 50.0)))
        if progress:
            progress.update(evalLoss=loss)
        events.emit("eval", step=step, loss=loss, perplexity=math.exp(min(loss, 50.0)))
        log.info("eval step %d loss %.4f ppl %.2f", step, loss, math.exp(min(loss, 50.0)))
        return loss

    def save(step: int, asynchronous: bool = cfg.checkpoint.async_save) -> None:
        failures = torch.tensor(float(manager.consecutive_failures), device=device)
        dist.all_reduce(failures, op=dist.ReduceOp.MAX)
        if failures.item() >= cfg.checkpoint.max_consecutive_failures:
            raise CheckpointFailedError(manager.consecutive_failures, committed["step"])
        blocked = manager.save(step, model, optimizer, state, asynchronous=asynchronous)
        metrics.checkpoint_blocked.observe(blocked)
        state["checkpointBlockedSeconds"] = state.get("checkpointBlockedSeconds", 0.0) + blocked

    def preempt(step: int) -> None:
        """SIGTERM: commit a checkpoint of this step within the grace period, or leave the last one."""
        deadline = preemption.received_at + cfg.checkpoint.preemption_grace_seconds
        manager.wait(timeout=max(0.0, deadline - time.monotonic()))
        if not manager.in_flight:
            save(step, asynchronous=True)
            result = manager.wait(timeout=max(0.0, deadline - time.monotonic()))
        else:
            result = None
        if result is not None and result.ok:
            events.emit("preempted", step=step)
            log.warning("SIGTERM: checkpoint of step %d committed; exiting for a restart to resume", step)
        else:
            events.emit("preempted", step=committed["step"], uncommittedStep=step)
            log.warning("SIGTERM: could not commit step %d within %.0fs; checkpoint %s stays the newest", step,
                        cfg.checkpoint.preemption_grace_seconds, committed["step"])
        raise SystemExit(EXIT_PREEMPTED)

    if start_step == 0 and not state["evals"]:
        run_eval(0)
    if progress:
        progress.update(phase="training", step=start_step)
    fwd.train()
    step = start_step
    while step < ts.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, ts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = rank_micro_batches(step, ts.global_batch_size, ts.micro_batch_size, len(train_data),
                                           ts.seed, rank, world)
        if step + 1 < ts.max_steps:  # remote shards: fetch the next step's sequences while this one runs
            train_data.prefetch(np.concatenate(rank_micro_batches(
                step + 1, ts.global_batch_size, ts.micro_batch_size, len(train_data), ts.seed, rank, world)))
        loss_sum = torch.zeros((), device=device)
        wait = 0.0
        for i, idx in enumerate(micro_batches):
            tw = time.perf_counter()
            batch = train_data.batch(idx).to(device, non_blocking=True)
            wait += time.perf_counter() - tw
            with no_sync(fwd, i == len(micro_batches) - 1), layout.autocast():
                logits = fwd(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()) / accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip or float("inf"))
        grad_norm = float(grad_norm_t.full_tensor() if hasattr(grad_norm_t, "full_tensor") else grad_norm_t)
        total, stop = all_sum([loss_sum.item(), float(preemption.requested)], device)
        train_loss = total / world
        if not math.isfinite(train_loss):
            raise NonFiniteError(step + 1, f"training loss ({train_loss})", committed["step"])
        if not math.isfinite(grad_norm):
            raise NonFiniteError(step + 1, f"gradient norm ({grad_norm})", committed["step"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == start_step + 1 and cfg.checkpoint.async_save:  # the optimizer state exists now
            manager.prepare(model, optimizer)  # host buffers for async saves, allocated in the background
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        mfu = tps * cost.flops_per_token / (peak * world)
        state["step"] = step
        state["trainLoss"].append([step, train_loss])
        state["elapsedSeconds"] += dt
        state["tokens"] += tokens_per_step
        metrics.loss.set(train_loss)
        metrics.learning_rate.set(lr)
        metrics.grad_norm.set(grad_norm)
        metrics.tokens_per_second.set(tps)
        metrics.mfu.set(mfu)
        metrics.step.set(step)
        metrics.tokens.inc(tokens_per_step * local_world / world)  # this node's share
        metrics.step_seconds.observe(dt)
        metrics.data_wait.inc(wait)
        if progress:
            progress.update(step=step, loss=train_loss, tokensPerSecond=tps, mfu=mfu,
                            etaSeconds=(ts.max_steps - step) * dt)
        events.emit("step", step=step, loss=train_loss, lr=lr, gradNorm=grad_norm, tokensPerSecond=tps, mfu=mfu,
                    seconds=dt, dataWait=wait, eta=(ts.max_steps - step) * dt)
        if ts.eval_every and step % ts.eval_every == 0 and step < ts.max_steps:
            run_eval(step)
        if stop:
            preempt(step)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < ts.max_steps:
            save(step)

    if not state["evals"] or state["evals"][-1]["step"] != step:
        run_eval(step)
    if committed["step"] != step:
        save(step, asynchronous=False)
    result = manager.wait()
    if result is not None and not result.ok:
        raise CheckpointFailedError(manager.consecutive_failures, committed["step"])
    if progress:
        progress.update(phase="exporting")
    results = summarize(state, cost.to_dict(), info)
    if cfg.checkpoint.export_hf:
        export_hf(model, mcfg, tokenizer, output / "model", layout.dtype, rank)
        results["model"] = str(output / "model")
        if rank == 0 and isinstance(store, S3Store):
            store.upload_tree(output / "model", "hf/")
            results["modelUri"] = store.child_uri("hf/")
    if rank == 0:
        (output / "results.json").write_text(json.dumps(results, indent=1))
    events.emit("done", **results)
    if progress:
        progress.update(phase="done")
    if server:
        server.close()
    dist.destroy_process_group()
    return results


def summarize(state: dict[str, Any], cost: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    evals = state["evals"]
    return {
        "steps": state["step"],
        "trainLoss": state["trainLoss"][-1][1] if state["trainLoss"] else None,
        "initialValidationLoss": evals[0]["loss"] if evals else None,
        "validationLoss": evals[-1]["loss"] if evals else None,
        "validationPerplexity": evals[-1]["perplexity"] if evals else None,
        "evaluations": evals,
        "trainLossHistory": state["trainLoss"],
        "tokensPerSecond": state["tokens"] / state["elapsedSeconds"] if state["elapsedSeconds"] else None,
        "trainingSeconds": state["elapsedSeconds"],
        "tokens": state["tokens"],
        **cost,
        "parallelism": info["parallelism"],
        "worldSize": info["worldSize"],
    }


def export_hf(model: torch.nn.Module, mcfg: Any, tokenizer: Any, out: Path, dtype: torch.dtype, rank: int) -> None:
    """Collective: gather full weights to rank 0 and write a Hugging Face model directory (safetensors)."""
    from transformers import LlamaForCausalLM

    weights = full_state_dict(model)
    if rank != 0:
        return
    with torch.device("meta"):
        hf = LlamaForCausalLM(mcfg)
    hf.load_state_dict(weights, assign=True)
    hf = hf.to(dtype=dtype)  # type: ignore[call-arg]
    hf.config.torch_dtype = dtype
    tmp = out.with_name(out.name + ".tmp")
    hf.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetrain_trainer.train")
    parser.add_argument("--config", required=True, help="trainer config (JSON, camelCase)")
    parser.add_argument("--output", required=True, help="directory for events, results and the exported model")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    events = Events(output / "events.jsonl" if int(os.environ.get("RANK", 0)) == 0 else None)
    try:
        from pydantic import ValidationError

        from .config import format_validation_error

        try:
            cfg = TrainerConfig.model_validate_json(Path(args.config).read_text())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from exc
        train(cfg, output)
        return 0
    except (ConfigError, NonFiniteError, CheckpointFailedError) as exc:
        events.emit("error", message=str(exc), exitCode=exc.exit_code)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
