"""Training throughput of the `tiny` preset: kubetrain vs a bare PyTorch loop vs transformers.Trainer.

Same model (tiny preset, ~7.3M parameters, 8k vocab), same prepared token shards, same batches
(sequence 256, micro-batch 8, global batch 16, fp32), same machine, all measured in one run.
Every contender runs in its own process:

  bare        the baseline: a plain PyTorch loop, 1 process, torch.set_num_threads(2), AdamW,
              cross-entropy on LlamaForCausalLM(input_ids).logits, 2 micro-batches per step
  hf-trainer  transformers.Trainer, 1 process, 2 threads, same model/batches/lr, no eval/save/logging
  kubetrain   `kubetrain run job.yaml --nproc N` exactly as a user runs it (N=2: DDP, 1 thread each;
              N=1: one process, 2 threads); tokens/s read from <output>/events.jsonl
  bare+compile  (with --compile) the bare loop with torch.compile(model)

Reported tokens/s is the median over the measured steps, after a warmup (with --rounds N: the median
over N interleaved runs of each contender). MFU is against a matmul peak measured in this run with 2
threads (kubetrain_trainer.metrics.measured_matmul_flops), using model_cost(cfg, 256).flops_per_token.
Before each run the script waits for the machine to be idle, and it measures how much CPU other
processes took during the run; a run where that exceeded 5% is repeated (--retries) and flagged.

    .venv/bin/python bench/train_throughput.py [--data DIR] [--steps 40] [--warmup 5] [--rounds 1] [--compile]

Without --data the shards are prepared with the project's own pipeline into a temporary directory:
`kubetrain prepare --input corpus://shakespeare --train-tokenizer 8000 --validation-split 0.05`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ = 256
MICRO = 8
GLOBAL = 16
LR = 0.002
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
LR_WARMUP = 30
MIN_LR_RATIO = 0.1
CLIP = 1.0
SEED = 1234
THREADS = 2
CONTENDED = 0.05  # other processes used more than this share of the machine during a measurement

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------------
# helpers shared by the workers
# ----------------------------------------------------------------------------------------------------
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


def worker_bare(data_dir: Path, total: int, compile_model: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from kubetrain_trainer.sampler import rank_micro_batches

    torch.set_num_threads(THREADS)
    _, model, shards = load_model_and_data(data_dir)
    model.train()
    fwd = torch.compile(model) if compile_model else model
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
            "compileSeconds": compile_seconds}


def worker_hf(data_dir: Path, total: int) -> dict:
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
            seq = shards.batch(self.order[k : k + 1])[0, :-1]  # 256 tokens; the model shifts labels itself
            return {"input_ids": seq, "labels": seq}

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
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[timer])
    result = trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return {"stepSeconds": timer.times, "meanLoss": result.training_loss, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------
# kubetrain, as users run it
# ----------------------------------------------------------------------------------------------------
def write_manifest(path: Path, data_dir: Path, total: int) -> None:
    import yaml

    manifest = {
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "bench-tiny"},
        "spec": {
            "model": {"preset": "tiny"},
            "tokenizer": {"path": str(data_dir / "tokenizer")},
            "data": {"train": str(data_dir / "train"), "validation": str(data_dir / "validation"),
                     "seqLength": SEQ},
            "training": {
                "maxSteps": total, "globalBatchSize": GLOBAL, "microBatchSize": MICRO,
                "optimizer": {"lr": LR, "betas": list(BETAS), "weightDecay": WEIGHT_DECAY},
                "schedule": {"warmupSteps": lr_warmup(total), "decay": "cosine", "minLrRatio": MIN_LR_RATIO},
                "gradClip": CLIP, "precision": "fp32", "parallelism": "auto",
                "evalEvery": 0, "evalBatches": 1, "seed": SEED,
            },
            "checkpoint": {"everySteps": 0, "keep": 1, "exportHF": False},
            "workers": {"procPerNode": 2},
            "metrics": {"port": 0},
        },
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def run_kubetrain(manifest: Path, out: Path, nproc: int, total: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # exactly as users run it: the launcher splits the cores itself
    cmd = [str(BIN / "kubetrain"), "run", str(manifest), "--output", str(out), "--nproc", str(nproc)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    events_path = out / "events.jsonl"
    n_steps = events_path.read_text().count('"type": "step"') if events_path.exists() else 0
    failure = None
    if proc.returncode:
        log = (out / "train.log").read_text(errors="replace") if (out / "train.log").exists() else ""
        last = [line for line in log.splitlines() if "Error" in line or "error:" in line][-1:] or [""]
        failure = f"exit code {proc.returncode} after {n_steps} steps: {last[0].strip()[:300]}"
        if n_steps < total:  # it failed before the measured steps were done: nothing to report
            raise RuntimeError(f"{' '.join(cmd)} failed ({failure}):\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}\n"
                               f"{log[-3000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    steps = [e for e in events if e["type"] == "step"]
    # Wall time between consecutive step events: also counts what happens outside the trainer's own
    # step timer (event/metrics bookkeeping); the first step has no predecessor and is skipped.
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(steps)]
    return {"stepSeconds": [e["seconds"] for e in steps], "tokensPerSecond": [e["tokensPerSecond"] for e in steps],
            "mfu": [e["mfu"] for e in steps], "losses": [e["loss"] for e in steps], "eventGaps": gaps,
            "parallelism": start["parallelism"], "worldSize": start["worldSize"], "threads": start["threads"],
            "peakFlops": start["peakFlops"], "commandSeconds": wall, "command": " ".join(cmd), "failure": failure}


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------
def run_worker(kind: str, data_dir: Path, total: int, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = Path(fh.name)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data_dir), "--total", str(total),
           "--result", str(result_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return result


def prepare_data(workdir: Path) -> Path:
    out = workdir / "data"
    cmd = [str(BIN / "kubetrain"), "prepare", "--input", "corpus://shakespeare", "--train-tokenizer", "8000",
           "--validation-split", "0.05", "--output", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a prepared directory (train/, validation/, tokenizer/)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per contender")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    p.add_argument("--rounds", type=int, default=1, help="measure every contender this often, interleaved; "
                   "report the median")
    p.add_argument("--compile", action="store_true", help="also time the bare loop under torch.compile")
    p.add_argument("--retries", type=int, default=2, help="re-measure a contender this often if other load "
                   "took more than 5%% of the machine during its run")
    p.add_argument("--json", type=Path, help="write all raw measurements here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        if args.worker == "bare":
            res = worker_bare(args.data, args.total, compile_model=False)
        elif args.worker == "bare-compile":
            res = worker_bare(args.data, args.total, compile_model=True)
        elif args.worker == "hf":
            res = worker_hf(args.data, args.total)
        else:
            raise SystemExit(f"unknown worker {args.worker}")
        args.result.write_text(json.dumps(res))
        return 0

    import torch
    from _machine import CpuMeter, code_version, wait_idle
    from kubetrain_api.config import ModelSpec
    from kubetrain_trainer.metrics import measured_matmul_flops
    from kubetrain_trainer.model import llama_config, model_cost
    from kubetrain_trainer.tokenizer import load_tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="kubetrain-bench-train-"))
    data_dir = args.data.resolve() if args.data else prepare_data(workdir)
    total = args.warmup + args.steps
    tokens_per_step = GLOBAL * SEQ
    cfg = llama_config(ModelSpec(preset="tiny"), len(load_tokenizer(data_dir / "tokenizer")), SEQ)
    cost = model_cost(cfg, SEQ)

    torch.set_num_threads(THREADS)
    wait_idle(log=lambda m: print(m, flush=True))
    peak = max(measured_matmul_flops(torch.device("cpu"), torch.float32, seconds=1.0) for _ in range(3))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()}")
    print(f"code: {code_version()}")
    print(f"model: tiny preset, {cost.parameters:,} parameters, {cost.flops_per_token / 1e6:.1f} MFLOP/token "
          f"(training); seq {SEQ}, micro-batch {MICRO}, global batch {GLOBAL}, fp32")
    print(f"data: {data_dir}")
    print(f"peak: measured fp32 matmul with {THREADS} threads = {peak / 1e9:.1f} GFLOP/s")
    print(f"steps: {args.warmup} warmup + {args.steps} measured per contender\n", flush=True)

    manifest = workdir / "bench-tiny.yaml"
    write_manifest(manifest, data_dir, total)
    def measure(key: str) -> dict:
        if key.startswith("kt"):
            out = workdir / f"run-{key}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh output: an old checkpoint would be resumed
            try:
                res = run_kubetrain(manifest, out, int(key[2:]), total)
            except RuntimeError as exc:
                res = {"error": str(exc)}
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            return res
        return run_worker(key, data_dir, total, timeout=900 if key == "bare-compile" else 600)

    def run_tps(res: dict) -> float:
        """Median tokens/s over the measured steps of one run (kubetrain: its own per-step number)."""
        if "tokensPerSecond" in res:
            return statistics.median(res["tokensPerSecond"][args.warmup :])
        return statistics.median(tokens_per_step / s for s in res["stepSeconds"][args.warmup :])

    plan = [("bare", "bare PyTorch loop (1 proc x 2 threads)"),
            ("hf", "transformers.Trainer (1 proc x 2 threads)"),
            ("kt2", "kubetrain run --nproc 2 (DDP, 2 x 1 thread)"),
            ("kt1", "kubetrain run --nproc 1 (1 proc x 2 threads)")]
    if args.compile:
        plan.append(("bare-compile", "bare loop + torch.compile (1 proc x 2 threads)"))
    labels = dict(plan)
    raw: dict[str, list[dict]] = {key: [] for key, _ in plan}
    for r in range(args.rounds):  # interleaved: a slow drift of the machine hits every contender alike
        for key, label in plan:
            t0 = time.perf_counter()
            res: dict = {}
            for attempt in range(1 + args.retries):
                wait_idle(log=lambda m: print(m, flush=True))
                with CpuMeter() as meter:
                    this = measure(key)
                this["contention"] = meter.result.foreign_share
                if not res or "error" in res or ("error" not in this and this["contention"] < res["contention"]):
                    res = this  # keep the least contended attempt
                if "error" in this or this["contention"] <= CONTENDED:
                    break
                if attempt < args.retries:
                    print(f"  {label}: {meter.result.describe()} during the run; measuring again", flush=True)
            raw[key].append(res)
            if "error" in res:
                print(f"  round {r + 1}: {label}: FAILED: {res['error'].strip().splitlines()[-1]}", flush=True)
            else:
                print(f"  round {r + 1}: {label}: {run_tps(res):,.0f} tokens/s (other load {res['contention']:.0%}; "
                      f"{time.perf_counter() - t0:.0f}s)", flush=True)

    # Runs that other processes disturbed (>5% of the machine) are left out when the contender has clean ones.
    ok = {}
    for key, runs in raw.items():
        good = [x for x in runs if "error" not in x]
        clean = [x for x in good if x["contention"] <= CONTENDED]
        ok[key] = clean or good
    tps = {key: statistics.median(run_tps(x) for x in runs) if runs else None for key, runs in ok.items()}
    base, hf = tps["bare"], tps["hf"]
    print(f"\nload average after: {os.getloadavg()}")
    print(f"tokens/s: median over the rounds ({args.rounds}) of each run's median step, leaving out runs with >5% "
          f"other load when there are clean ones; range: slowest..fastest run used; n: runs used\n")
    head = (f"| {'contender':<48} | {'tokens/s':>9} | {'range':>13} | {'n':>2} | {'vs bare':>7} | {'vs Trainer':>10} | "
            f"{'MFU':>6} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for key, label in plan:
        t = tps[key]
        if t is None:
            print(f"| {label:<48} | {'failed':>9} | {'':>13} | {'':>2} | {'':>7} | {'':>10} | {'':>6} |")
            continue
        each = [run_tps(x) for x in ok[key]]
        rng = f"{min(each):,.0f}..{max(each):,.0f}"
        vb = f"{t / base:.2f}x" if base else "-"
        vh = f"{t / hf:.2f}x" if hf else "-"
        print(f"| {label:<48} | {t:>9,.0f} | {rng:>13} | {len(each):>2} | {vb:>7} | {vh:>10} | "
              f"{t * cost.flops_per_token / peak:>6.1%} |")

    print("\nnotes (last run used of each):")
    for key, label in plan:
        if not ok[key]:
            print(f"  {label}: failed: {raw[key][-1]['error'].strip()[-500:]}")
            continue
        res = ok[key][-1]
        if key.startswith("kt"):
            wall_tps = statistics.median(tokens_per_step / g for g in res["eventGaps"][args.warmup :])
            own_mfu = statistics.median(res["mfu"][args.warmup :])
            note = (f"{res['parallelism']} x {res['worldSize']}, {res['threads']} thread(s)/proc; wall time between "
                    f"step events {wall_tps:,.0f} tok/s; its own MFU figure {own_mfu:.1%} (peak it measured "
                    f"{res['peakFlops'] / 1e9:.0f} GFLOP/s x {res['worldSize']})")
            if res["failure"]:
                note += f"; ALL STEPS RAN, BUT THE RUN THEN FAILED ({res['failure']})"
        else:
            note = f"{res['threads']} threads"
            if res.get("compileSeconds"):
                note += f"; first (compiling) step {res['compileSeconds']:.0f}s"
        loss = res.get("meanLoss") or statistics.fmean(res["losses"])
        worst = max(x["contention"] for x in ok[key])
        dropped = len([x for x in raw[key] if "error" not in x]) - len(ok[key])
        note += f"; mean train loss {loss:.3f}; other load during the runs used <= {worst:.0%}"
        if dropped:
            note += f"; {dropped} disturbed run(s) left out"
        if worst > CONTENDED:
            note += " (CONTENDED: treat with suspicion)"
        print(f"  {label}: {note}")
    if args.rounds > 1 and base and hf:
        def mark(a: dict, b: dict) -> str:
            return "*" if max(a["contention"], b["contention"]) > CONTENDED else ""

        print("  per-round ratios (same round; * = a disturbed run): " + "; ".join(
            f"{labels[k].split(' (')[0]} vs Trainer "
            + "/".join(f"{run_tps(a) / run_tps(b):.2f}{mark(a, b)}" for a, b in zip(raw[k], raw["hf"], strict=True)
                       if "error" not in a and "error" not in b)
            for k in ("kt2", "kt1")))

    print("\ntargets (issue): kubetrain >= 1.05x transformers.Trainer and >= 0.97x the bare loop")
    for key in ("kt2", "kt1"):
        t = tps[key]
        if t and base and hf:
            print(f"  {labels[key]}: vs Trainer {t / hf:.3f}x {'MET' if t / hf >= 1.05 else 'MISSED'}; "
                  f"vs bare {t / base:.3f}x {'MET' if t / base >= 0.97 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"peakFlops": peak, "flopsPerToken": cost.flops_per_token, "runs": raw},
                                        indent=1))
    if not args.data:
        shutil.rmtree(workdir / "data", ignore_errors=True)
    print(f"\nmanifest and kubetrain outputs kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
