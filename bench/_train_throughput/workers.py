"""The two contenders that are not kubetrain, each run in a process of its own (bench/train_throughput.py
--worker KIND): a bare PyTorch loop (optionally under torch.compile) and transformers.Trainer."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

from . import BETAS, CLIP, EVAL_SEQUENCES, GLOBAL, LR, LR_WARMUP, MICRO, MIN_LR_RATIO, SEED, SEQ, THREADS, WEIGHT_DECAY


def lr_warmup(total: int) -> int:
    """The tiny-cpu.yaml warmup (30 steps), shortened for short runs (kubetrain needs warmup < maxSteps)."""
    return min(LR_WARMUP, total // 2)


def lr_at(step: int, total: int) -> float:
    """Linear warmup then cosine to MIN_LR_RATIO·LR (the tiny-cpu.yaml schedule); cost-free, for parity."""
    warm = lr_warmup(total)
    if step < warm:
        return LR * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = LR * MIN_LR_RATIO
    return floor + (LR - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_model_and_data(data_dir: Path):
    from kubetrain_api.config import ModelSpec
    from kubetrain_trainer.model import build_model, llama_config
    from kubetrain_trainer.shards import TokenShards
    from kubetrain_trainer.tokenizer import load_tokenizer

    tok = load_tokenizer(data_dir / "tokenizer")
    shards = TokenShards(data_dir / "train", SEQ)
    cfg = llama_config(ModelSpec(preset="tiny"), len(tok), SEQ)
    model = build_model(cfg, "cpu", seed=SEED)  # the same initial weights kubetrain builds
    return cfg, model, shards


def validation_loss(model, data_dir: Path) -> float:
    """Mean token cross-entropy over the first EVAL_SEQUENCES validation sequences, each predicting all SEQ
    positions: kubetrain's own evaluation (Trainer._validation_loss), so the numbers compare."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from kubetrain_trainer.shards import TokenShards

    data = TokenShards(data_dir / "validation", SEQ)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, min(EVAL_SEQUENCES, len(data)), MICRO):
            batch = data.batch(np.arange(start, min(start + MICRO, EVAL_SEQUENCES, len(data))))
            logits = model(input_ids=batch[:, :-1]).logits
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    return total / count


def worker_bare(data_dir: Path, total: int, compile_model: str | None) -> dict:
    """compile_model: None (eager), "model" (torch.compile of the whole model) or "blocks" (each decoder block,
    as kubetrain's training.compile does)."""
    import torch
    import torch.nn.functional as F
    from kubetrain_trainer.sampler import rank_micro_batches

    torch.set_num_threads(THREADS)
    _, model, shards = load_model_and_data(data_dir)
    model.train()
    fwd = torch.compile(model) if compile_model == "model" else model
    if compile_model == "blocks":
        for block in model.model.layers:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    accum = GLOBAL // MICRO
    times, losses = [], []
    compile_seconds = None
    for step in range(total):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total)
        loss_sum = 0.0
        for idx in rank_micro_batches(step, GLOBAL, MICRO, len(shards), SEED, 0, 1):
            batch = shards.batch(idx)
            logits = fwd(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step == 0 and compile_model:
            compile_seconds = dt
        times.append(dt)
        losses.append(loss_sum)
    return {"stepSeconds": times, "losses": losses, "threads": torch.get_num_threads(),
            "compileSeconds": compile_seconds, "validationLoss": validation_loss(model, data_dir)}


def worker_hf(data_dir: Path, total: int) -> dict:
    """transformers.Trainer on the same model, batches and schedule. (Longer than most: its dataset and step
    timer subclass torch and transformers classes, which only the worker process imports.)"""
    import numpy as np
    import torch
    from kubetrain_trainer.sampler import global_batch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(THREADS)
    _, model, shards = load_model_and_data(data_dir)

    class Sequences(torch.utils.data.Dataset):
        """Item k is the k-th sequence kubetrain's sampler draws (step k//16), so with a sequential
        sampler, batch 8 and 2 accumulation steps the Trainer sees exactly kubetrain's micro-batches."""

        def __init__(self) -> None:
            self.order = np.concatenate([global_batch(s, GLOBAL, len(shards), SEED) for s in range(total)])

        def __len__(self) -> int:
            return len(self.order)

        def __getitem__(self, k: int) -> dict:
            seq = shards.batch(self.order[k : k + 1])[0]  # SEQ + 1 tokens
            # The loss kubetrain and the bare loop train on: all SEQ positions predict their next token. With
            # only `labels` the model shifts them itself and the last position predicts nothing (SEQ - 1).
            return {"input_ids": seq[:-1], "labels": seq[:-1], "shift_labels": seq[1:]}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last = 0.0
            self.times: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # end-to-end: includes batch fetching
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    out = Path(tempfile.mkdtemp(prefix="hf-trainer-"))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL // MICRO,
        max_steps=total, learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_epsilon=1e-8, max_grad_norm=CLIP, warmup_steps=lr_warmup(total), lr_scheduler_type="cosine",
        optim="adamw_torch", logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=SEED, disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    class SameSchedule(Trainer):
        """The Trainer with kubetrain's learning rate at every step (its own warmup starts at lr 0, and
        kubetrain's at lr/warmup): the same optimizer steps, so that the validation losses compare."""

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: lr_at(step, total) / LR)
            return self.lr_scheduler

    timer = StepTimer()
    trainer = SameSchedule(model=model, args=args, train_dataset=Sequences(), callbacks=[timer])
    result = trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return {"stepSeconds": timer.times, "meanLoss": result.training_loss, "threads": torch.get_num_threads(),
            "validationLoss": validation_loss(model, data_dir)}
