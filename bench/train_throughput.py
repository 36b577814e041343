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
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

# The parts live in bench/_train_throughput/, one concern per module (its __init__ lists them).
from _train_throughput import driver, report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a prepared directory (train/, validation/, tokenizer/)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per contender")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    p.add_argument("--rounds", type=int, default=1, help="measure every contender this often, interleaved; "
                   "report the median")
    p.add_argument("--compile", action="store_true", help="also time the bare loop under torch.compile")
    p.add_argument("--only", help="run only these contenders (comma-separated keys: bare, hf, kt2, kt1, "
                   "bare-compile, bare-blocks, kt2c, kt1c)")
    p.add_argument("--retries", type=int, default=2, help="re-measure a contender this often if other load "
                   "took more than 5%% of the machine during its run")
    p.add_argument("--json", type=Path, help="write all raw measurements here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def worker(args: argparse.Namespace) -> int:
    """This script run by the driver as one contender's process (--worker KIND): its raw result to --result."""
    from _train_throughput.workers import worker_bare, worker_hf

    if args.worker == "bare":
        res = worker_bare(args.data, args.total, compile_model=None)
    elif args.worker == "bare-compile":
        res = worker_bare(args.data, args.total, compile_model="model")
    elif args.worker == "bare-blocks":
        res = worker_bare(args.data, args.total, compile_model="blocks")
    elif args.worker == "hf":
        res = worker_hf(args.data, args.total)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    args.result.write_text(json.dumps(res))
    return 0


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker(args)

    setup = driver.set_up(args)
    contenders = driver.plan(args.compile)
    if args.only:
        contenders = [c for c in contenders if c[0] in args.only.split(",")]
    raw = driver.rounds(setup, contenders, args.rounds, args.retries)
    ok = driver.usable(raw)
    tps = {key: statistics.median(driver.run_tps(x, args.warmup) for x in runs) if runs else None
           for key, runs in ok.items()}
    results = report.Results(setup, contenders, args.rounds, raw, ok, tps)

    print(f"\nload average after: {os.getloadavg()}")
    print(f"tokens/s: median over the rounds ({args.rounds}) of each run's median step, leaving out runs with >5% "
          f"other load when there are clean ones; range: slowest..fastest run used; n: runs used\n")
    report.print_table(results)
    report.print_notes(results)
    report.print_targets(results)
    if args.json:
        args.json.write_text(json.dumps({"peakFlops": setup.peak, "flopsPerToken": setup.flops_per_token,
                                         "runs": raw}, indent=1))
    if not args.data:
        shutil.rmtree(setup.workdir / "data", ignore_errors=True)
    print(f"\nmanifest and kubetrain outputs kept in {setup.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
