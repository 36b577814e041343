"""The training loop as an object, as torchtitan's Trainer: `train` → `train_step` → `forward_backward`,
with `evaluate`, `save` and `preempt`.

One Trainer per process (torchrun starts one per device); every method that says "collective" must be
called by all ranks at the same step. The state a resume needs beyond the model and optimizer — the
step, the loss and evaluation histories, the time and tokens so far — lives on the object:
`state_dict()` is what each checkpoint stores as trainer_state.json, `load_state_dict()` reads it back.
Rank 0 writes events.jsonl and results.json and serves /progress; local rank 0 of every node serves
/metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from kubetrain_api.config import TrainerConfig
from kubetrain_api.contract import EVENTS_FILE, MODEL_DIR, RESULTS_FILE
from kubetrain_api.exit_codes import EXIT_PREEMPTED

from . import compile_cache
from .checkpoint import CheckpointManager, SaveResult, checkpoint_uri, step_dir_name
from .distributed import all_sum, init_distributed
from .errors import CheckpointFailedError, ConcurrentWriterError, NonFiniteError, TrainerError
from .events import Events
from .export import export_hf, publish_export
from .inputs import open_inputs
from .metrics import MetricsServer, ProgressState, TrainingMetrics, device_peak_flops
from .model import build_model, llama_config, load_pretrained_weights, model_cost, model_fingerprint
from .optim import build_optimizer, lr_at
from .parallelize import choose_parallelism, no_sync, parallelize
from .preemption import Preemption
from .sampler import eval_micro_batches, rank_micro_batches
from .storage import S3Store, open_store, start_error

log = logging.getLogger("kubetrain.train")


class Trainer:
    def __init__(self, cfg: TrainerConfig, output: Path):
        """Collective: join the process group, open and check the inputs, build the parallelised model and
        optimizer, start the metrics server, and resume from the newest committed checkpoint if any.
        One method, in this order, because every rank must reach the same collectives in the same order."""
        self.cfg, self.output = cfg, output
        self.rank, self.world, self.local_rank, self.device = init_distributed()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING,
                            format=f"[rank{self.rank}] %(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
        ts = cfg.training
        self.events = Events(output / EVENTS_FILE if self.rank == 0 else None)
        self.preemption = Preemption()
        self.inputs = open_inputs(cfg, self.world, output)

        self.mcfg = llama_config(cfg.model, len(self.inputs.tokenizer), cfg.data.seq_length)
        self.cost = model_cost(self.mcfg, cfg.data.seq_length)
        self.model = build_model(self.mcfg, self.device, seed=ts.seed)
        if cfg.model.init_from:
            load_pretrained_weights(self.model, cfg.model.init_from)
        parallelism = choose_parallelism(ts, self.world, self.cost.parameters, self.device)
        self.fwd, self.layout = parallelize(self.model, ts, parallelism, self.device)
        self.optimizer = build_optimizer(self.model, ts, self.device)

        self.metrics = TrainingMetrics()
        self.progress = ProgressState(ts.max_steps) if self.rank == 0 else None
        self.server = MetricsServer(self.metrics, self.progress, cfg.metrics.port) if self.local_rank == 0 else None
        self.peak_flops = self._start_metrics()

        # What trainer_state.json holds (see state_dict), then the checkpoint bookkeeping: the newest
        # committed step and the failed saves, updated by the checkpoint thread when a save ends.
        self.step = 0
        self.train_losses: list[list[float]] = []  # [step, loss] after every step
        self.evals: list[dict[str, Any]] = []
        self.elapsed_seconds = 0.0
        self.tokens = 0
        self.checkpoint_blocked_seconds = 0.0
        self.committed_step: int | None = None
        self.checkpoint_failures = 0
        self.store = open_store(checkpoint_uri(cfg, output), cfg.s3)
        self.checkpoints = CheckpointManager(
            self.store, cfg.checkpoint.keep, self.rank,
            {"model": model_fingerprint(self.mcfg), "tokenizer": self.inputs.tokenizer_fingerprint}, s3=cfg.s3,
            process_group=dist.new_group(backend="gloo"), on_result=self._on_save_result)
        self._resume()
        self.start_step = self.step
        self.compile_cache = self._restore_compile_cache() if ts.compiles else None

        self.tokens_per_step = ts.global_batch_size * cfg.data.seq_length
        self.n_eval = min(len(self.inputs.validation), ts.eval_batches * ts.global_batch_size)
        self.accum = ts.global_batch_size // self.world // ts.micro_batch_size
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.info = {"rank": self.rank, "worldSize": self.world, "parallelism": self.layout.parallelism,
                     "dtype": str(self.layout.dtype), "device": self.device.type, "threads": torch.get_num_threads(),
                     "compiled": ts.compiles,
                     "peakFlops": self.peak_flops, "trainSequences": len(self.inputs.train),
                     "validationSequences": len(self.inputs.validation), "evalSequences": self.n_eval,
                     "gradientAccumulation": self.accum, "startStep": self.start_step,
                     "metricsPort": self.server.port if self.server else None, **self.cost.to_dict()}
        self.events.emit("start", **self.info)
        log.info("start %s", json.dumps(self.info))

    def _start_metrics(self) -> float:
        """Collective: set the run's constant gauges; returns the peak FLOP/s per device for MFU."""
        m = self.metrics
        m.parameters.set(self.cost.parameters)
        m.flops_per_token.set(self.cost.flops_per_token)
        m.max_steps.set(self.cfg.training.max_steps)
        m.world_size.set(self.world)
        peak = self.cfg.metrics.peak_flops or device_peak_flops(self.device, self.layout.dtype)
        # Every rank measured its own peak on CPU; use the mean so MFU is the same number everywhere.
        return all_sum([peak], self.device)[0] / self.world

    def _restore_compile_cache(self) -> compile_cache.CacheState:
        """Collective: the first process of each node unpacks the stored compile cache (compile_cache) into
        the local one; the others wait for it, so that none starts compiling into a half-written cache."""
        directory = compile_cache.cache_directory(self.output)
        key = compile_cache.archive_key(self.device)
        state = compile_cache.restore(self.store, directory, key) if self.local_rank == 0 else \
            compile_cache.CacheState(directory, key)  # only rank 0 (a first process) stores it
        if self.world > 1:
            dist.barrier()
        return state

    def _report_compile(self, first_step_seconds: float) -> None:
        """After this run's first step, which compiled the blocks (and, at step 0, the evaluation): how long it
        took and how warm the cache was, and rank 0 stores the cache if it learned anything."""
        assert self.compile_cache is not None
        from torch._dynamo.utils import counters

        stored = compile_cache.publish(self.store, self.compile_cache) if self.rank == 0 else 0
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        self.events.emit("compile", firstStepSeconds=first_step_seconds, cacheRestored=self.compile_cache.restored,
                         cacheHits=hits, cacheMisses=misses, storedBytes=stored,
                         cacheUri=self.store.child_uri(self.compile_cache.key))
        log.info("compile: first step %.1fs, inductor cache %d hits / %d misses (archive %s)", first_step_seconds,
                 hits, misses, "restored" if self.compile_cache.restored else "none stored yet")

    def _resume(self) -> None:
        """Collective: rank 0 cleans up after a crash and picks the newest intact checkpoint; every rank
        loads that same step (a storage error is raised on every rank: storage.start_error's)."""
        latest: list[Any] = [None]  # broadcast_object_list's box
        if self.rank == 0:
            try:
                self.checkpoints.clean_up_after_crash()
                latest[0] = self.checkpoints.latest()
                self.checkpoints.discard_damaged()
                self.checkpoints.load_catalogue(latest[0])
            except Exception as exc:
                latest[0] = start_error(f"checkpoint.uri: cannot read {self.store.uri}", exc,
                                        "check the bucket, s3.endpoint and the credentials")
        dist.broadcast_object_list(latest, src=0)
        if isinstance(latest[0], TrainerError):
            raise latest[0]
        step = latest[0]
        if step is None:
            return
        self.load_state_dict(self.checkpoints.load(step, self.model, self.optimizer))
        log.info("resumed from %s at step %d", self.store.child_uri(step_dir_name(step)), step)
        self.committed_step = step
        self.metrics.checkpoint_step.set(step)
        if self.progress and self.checkpoints.catalogue:  # what status shows before the first new commit
            self.progress.update(checkpoint=self.checkpoints.catalogue[-1], checkpoints=self.checkpoints.catalogue)

    def state_dict(self) -> dict[str, Any]:
        """trainer_state.json: the step to resume from and the histories the summary reports."""
        return {"step": self.step, "trainLoss": self.train_losses, "evals": self.evals,
                "elapsedSeconds": self.elapsed_seconds, "tokens": self.tokens,
                "checkpointBlockedSeconds": self.checkpoint_blocked_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.train_losses = state["trainLoss"]
        self.evals = state["evals"]
        self.elapsed_seconds = state["elapsedSeconds"]
        self.tokens = state["tokens"]
        self.checkpoint_blocked_seconds = state.get("checkpointBlockedSeconds", 0.0)  # absent in older ones

    # -- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Collective: train to training.maxSteps, evaluating and checkpointing on schedule, then evaluate,
        commit a final checkpoint, export and write results.json. Returns the results."""
        ts, ck = self.cfg.training, self.cfg.checkpoint
        if self.step == 0 and not self.evals:
            self.evaluate()  # the loss before training, for the summary's "before → after"
        if self.progress:
            self.progress.update(phase="training", step=self.start_step)
        self.fwd.train()
        while self.step < ts.max_steps:
            t0 = time.perf_counter()
            stop = self.train_step()
            if self.compile_cache and self.step == self.start_step + 1:
                self._report_compile(time.perf_counter() - t0)
            if ts.eval_every and self.step % ts.eval_every == 0 and self.step < ts.max_steps:
                self.evaluate()
            if stop:
                self.preempt()
            if ck.every_steps and self.step % ck.every_steps == 0 and self.step < ts.max_steps:
                self.save()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evaluate()
        if self.committed_step != self.step:
            self.save(asynchronous=False)
        result = self.checkpoints.wait()
        # Agreed by all ranks (rank 0 alone commits), so that none goes on to the export's collectives alone.
        failed = torch.tensor([float(result is not None and not result.ok),
                               float(self.checkpoints.writer_conflict is not None)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed[1].item():
            self._raise_writer_conflict()
        if failed[0].item():
            raise CheckpointFailedError(self.checkpoints.consecutive_failures, self.committed_step)
        return self._finish()

    def train_step(self) -> bool:
        """Collective: one optimizer step. Returns whether any rank has received SIGTERM: agreed in the same
        all-reduce as the loss, so that every rank stops after the same step."""
        ts = self.cfg.training
        t0 = time.perf_counter()
        lr = lr_at(self.step, ts)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self._micro_batches(self.step)
        if self.step + 1 < ts.max_steps:  # remote shards: fetch the next step's sequences while this one runs
            self.inputs.train.prefetch(np.concatenate(self._micro_batches(self.step + 1)))
        loss_sum, wait = self.forward_backward(micro_batches)
        grad_norm_t = torch.nn.utils.clip_grad_norm_(self.model.parameters(), ts.grad_clip or float("inf"))
        grad_norm = float(grad_norm_t.full_tensor() if hasattr(grad_norm_t, "full_tensor") else grad_norm_t)
        total, stop = all_sum([loss_sum.item(), float(self.preemption.requested)], self.device)
        train_loss = total / self.world
        # Checked before the optimizer applies the step, so the newest checkpoint is still a good one.
        if not math.isfinite(train_loss):
            raise NonFiniteError(self.step + 1, f"training loss ({train_loss})", self.committed_step)
        if not math.isfinite(grad_norm):
            raise NonFiniteError(self.step + 1, f"gradient norm ({grad_norm})", self.committed_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.step == self.start_step + 1 and self.cfg.checkpoint.async_save:  # the optimizer state exists now
            self.checkpoints.prepare(self.model, self.optimizer)  # host buffers for async saves, in the background
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._record_step(lr, train_loss, grad_norm, time.perf_counter() - t0, wait)
        return bool(stop)

    def _micro_batches(self, step: int) -> list[np.ndarray]:
        ts = self.cfg.training
        return rank_micro_batches(step, ts.global_batch_size, ts.micro_batch_size, len(self.inputs.train),
                                  ts.seed, self.rank, self.world)

    def forward_backward(self, micro_batches: list[np.ndarray]) -> tuple[torch.Tensor, float]:
        """Accumulate the gradients of this rank's micro-batches (synchronised between ranks on the last
        only). Returns the loss summed over them (each already divided by the accumulation steps) and the
        seconds spent waiting for batches."""
        loss_sum = torch.zeros((), device=self.device)
        wait = 0.0
        for i, idx in enumerate(micro_batches):
            tw = time.perf_counter()
            batch = self.inputs.train.batch(idx).to(self.device, non_blocking=True)
            wait += time.perf_counter() - tw
            with no_sync(self.fwd, i == len(micro_batches) - 1), self.layout.autocast():
                logits = self.fwd(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()) / self.accum
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum, wait

    def _record_step(self, lr: float, loss: float, grad_norm: float, seconds: float, wait: float) -> None:
        """The finished step into the state, the metrics, /progress and events.jsonl."""
        steps_left = self.cfg.training.max_steps - self.step
        tps = self.tokens_per_step / seconds
        mfu = tps * self.cost.flops_per_token / (self.peak_flops * self.world)
        self.train_losses.append([self.step, loss])
        self.elapsed_seconds += seconds
        self.tokens += self.tokens_per_step
        m = self.metrics
        m.loss.set(loss)
        m.learning_rate.set(lr)
        m.grad_norm.set(grad_norm)
        m.tokens_per_second.set(tps)
        m.mfu.set(mfu)
        m.step.set(self.step)
        m.tokens.inc(self.tokens_per_step * self.local_world / self.world)  # this node's share
        m.step_seconds.observe(seconds)
        m.data_wait.inc(wait)
        if self.progress:
            self.progress.update(step=self.step, loss=loss, tokensPerSecond=tps, mfu=mfu,
                                 etaSeconds=steps_left * seconds)
        self.events.emit("step", step=self.step, loss=loss, lr=lr, gradNorm=grad_norm, tokensPerSecond=tps,
                         mfu=mfu, seconds=seconds, dataWait=wait, eta=steps_left * seconds)

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Collective: the validation loss at the current step, recorded in the history, the metrics,
        /progress and events.jsonl."""
        loss = self._validation_loss()
        perplexity = math.exp(min(loss, 50.0))
        self.evals.append({"step": self.step, "loss": loss, "perplexity": perplexity})
        self.metrics.eval_loss.set(loss)
        self.metrics.eval_perplexity.set(perplexity)
        if self.progress:
            self.progress.update(evalLoss=loss, evalPerplexity=perplexity)
        self.events.emit("eval", step=self.step, loss=loss, perplexity=perplexity)
        log.info("eval step %d loss %.4f ppl %.2f", self.step, loss, perplexity)
        return loss

    @torch.no_grad()
    def _validation_loss(self) -> float:
        """Mean token loss over the first n_eval validation sequences, independent of the world size.
        Every rank runs the same number of forward passes (FSDP needs that); padding rows weigh 0."""
        micro, data = self.cfg.training.micro_batch_size, self.inputs.validation
        self.fwd.eval()
        batches = eval_micro_batches(self.n_eval, micro, self.rank, self.world)
        passes = math.ceil(math.ceil(self.n_eval / self.world) / micro)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for i in range(passes):
            idx = batches[i] if i < len(batches) else np.zeros(0, dtype=np.int64)
            real = len(idx)
            padded = np.concatenate([idx, np.zeros(micro - real, dtype=np.int64)]) if real < micro else idx
            batch = data.batch(padded).to(self.device, non_blocking=True)
            with self.layout.autocast():
                logits = self.fwd(input_ids=batch[:, :-1]).logits
            losses = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            total += losses.view(micro, -1)[:real].double().sum()
            count += real * data.seq_length
        self.fwd.train()
        s, c = all_sum([total.item(), float(count)], self.device)
        return s / c

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, asynchronous: bool | None = None) -> None:
        """Collective: start a checkpoint of the current step (asynchronous unless checkpoint.asyncSave is
        off or the caller says otherwise). Stops the job, on every rank, once a rank has seen
        checkpoint.maxConsecutiveFailures saves in a row fail, or at once once rank 0 has seen another
        writer commit under the same checkpoint.uri."""
        if asynchronous is None:
            asynchronous = self.cfg.checkpoint.async_save
        flags = torch.tensor([float(self.checkpoints.consecutive_failures),
                              float(self.checkpoints.writer_conflict is not None)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1].item():
            self._raise_writer_conflict()
        if flags[0].item() >= self.cfg.checkpoint.max_consecutive_failures:
            raise CheckpointFailedError(self.checkpoints.consecutive_failures, self.committed_step)
        blocked = self.checkpoints.save(self.step, self.model, self.optimizer, self.state_dict(),
                                        asynchronous=asynchronous)
        self.metrics.checkpoint_blocked.observe(blocked)
        self.checkpoint_blocked_seconds += blocked

    def _raise_writer_conflict(self) -> None:
        """Collective: every rank stops with rank 0's ConcurrentWriterError (it alone commits, so it alone
        knows what it found)."""
        message = [self.checkpoints.writer_conflict]
        dist.broadcast_object_list(message, src=0)
        raise ConcurrentWriterError(message[0])

    def _on_save_result(self, result: SaveResult) -> None:
        """Runs in the checkpoint thread when a save ends: the metrics, /progress and events.jsonl."""
        m = self.metrics
        m.checkpoint_seconds.observe(result.total_seconds)
        m.checkpoint_bytes.inc(result.bytes_written)
        if result.total_seconds > 0:
            m.checkpoint_throughput.set(result.bytes_written / result.total_seconds)
        if result.ok:
            self.committed_step = result.step
            m.checkpoint_step.set(result.step)
            info = {"step": result.step, "uri": self.store.child_uri(step_dir_name(result.step)),
                    "time": result.committed_at or time.time()}
            catalogue = self.checkpoints.catalogue  # (rank 0's; retention has run)
            if self.progress:
                self.progress.update(checkpoint=info, checkpoints=catalogue,
                                     checkpointFailures=self.checkpoint_failures)
            self.events.emit("checkpoint", step=result.step, seconds=result.total_seconds,
                             blockedSeconds=result.blocked_seconds, bytes=result.bytes_written, path=info["uri"],
                             committedAt=info["time"], checkpoints=catalogue)
            log.info("checkpoint step %d committed: %.2fs in all, %.3fs blocking, %.1f MB", result.step,
                     result.total_seconds, result.blocked_seconds, result.bytes_written / 1e6)
        else:
            self.checkpoint_failures += 1
            m.checkpoint_failures.inc()
            if self.progress:
                self.progress.update(checkpointFailures=self.checkpoint_failures, lastCheckpointError=result.error)
            self.events.emit("checkpoint_failed", step=result.step, error=result.error)

    def preempt(self) -> None:
        """Collective, after SIGTERM: commit a checkpoint of this step within checkpoint.preemptionGraceSeconds
        of the signal (or leave the last committed one as the newest), then exit with EXIT_PREEMPTED."""
        grace = self.cfg.checkpoint.preemption_grace_seconds
        deadline = self.preemption.received_at + grace
        self.checkpoints.wait(timeout=max(0.0, deadline - time.monotonic()))
        result = None
        if not self.checkpoints.in_flight:
            self.save(asynchronous=True)
            result = self.checkpoints.wait(timeout=max(0.0, deadline - time.monotonic()))
        if result is not None and result.ok:
            self.events.emit("preempted", step=self.step)
            log.warning("SIGTERM: checkpoint of step %d committed; exiting for a restart to resume", self.step)
        else:
            self.events.emit("preempted", step=self.committed_step, uncommittedStep=self.step)
            log.warning("SIGTERM: could not commit step %d within %.0fs; checkpoint %s stays the newest", self.step,
                        grace, self.committed_step)
        raise SystemExit(EXIT_PREEMPTED)

    # -- the end -------------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        """Collective: export the model, write results.json, report done, leave the process group."""
        if self.progress:
            self.progress.update(phase="exporting")
        results = summarize(self.state_dict(), self.cost.to_dict(), self.info)
        if self.device.type == "cuda":  # this process's high-water mark of tensor memory (the allocator's)
            results["peakDeviceMemoryBytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.cfg.checkpoint.export_hf:
            model_dir = self.output / MODEL_DIR
            export_hf(self.model, self.mcfg, self.inputs.tokenizer, model_dir, self.layout.dtype, self.rank)
            results["model"] = str(model_dir)
            if self.rank == 0 and isinstance(self.store, S3Store):
                results["modelUri"] = publish_export(self.store, model_dir, "hf/")
        if self.rank == 0:
            (self.output / RESULTS_FILE).write_text(json.dumps(results, indent=1))
        self.events.emit("done", **results)
        if self.progress:
            self.progress.update(phase="done")
        if self.server:
            self.server.close()
        dist.destroy_process_group()
        return results


def summarize(state: dict[str, Any], cost: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """results.json: the trainer state's histories summed up, with the model's cost and the layout."""
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
