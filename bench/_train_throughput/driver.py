"""The measurement: the data and the matmul peak, then rounds of every contender in turn (interleaved, so
a slow drift of the machine hits every contender alike), each re-measured while other load contends it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import BIN, CONTENDED, GLOBAL, MICRO, SCRIPT, SEQ, THREADS
from .kubetrain import run_kubetrain, write_manifest

TOKENS_PER_STEP = GLOBAL * SEQ


@dataclass
class Setup:
    """What every contender's measurement shares."""

    workdir: Path
    data_dir: Path
    manifests: dict[bool, Path]  # by training.compile
    total: int  # steps per run: warmup + measured
    warmup: int
    flops_per_token: float
    peak: float  # measured fp32 matmul FLOP/s with THREADS threads


def plan(compile_model: bool) -> list[tuple[str, str]]:
    """(key, label) of every contender, in the order they run in each round."""
    contenders = [("bare", "bare PyTorch loop (1 proc x 2 threads)"),
                  ("hf", "transformers.Trainer (1 proc x 2 threads)"),
                  ("kt2", "kubetrain run --nproc 2 (DDP, 2 x 1 thread)"),
                  ("kt1", "kubetrain run --nproc 1 (1 proc x 2 threads)")]
    if compile_model:
        contenders += [("bare-compile", "bare loop + torch.compile (1 proc x 2 threads)"),
                       ("bare-blocks", "bare loop + compile per block (1 proc x 2 threads)"),
                       ("kt2c", "kubetrain run --nproc 2, compile (DDP, 2 x 1 thread)"),
                       ("kt1c", "kubetrain run --nproc 1, compile (1 proc x 2 threads)")]
    return contenders


def set_up(args: argparse.Namespace) -> Setup:
    """The data (prepared here without --data), the model's cost and the machine's peak, printed."""
    import torch
    from _machine import code_version, wait_idle
    from kubetrain_api.config import ModelSpec
    from kubetrain_trainer.metrics import measured_matmul_flops
    from kubetrain_trainer.model import llama_config, model_cost
    from kubetrain_trainer.tokenizer import load_tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="kubetrain-bench-train-"))
    data_dir = args.data.resolve() if args.data else prepare_data(workdir)
    total = args.warmup + args.steps
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

    manifests = {compiled: workdir / f"bench-tiny{'-compile' if compiled else ''}.yaml" for compiled in (False, True)}
    for compiled, path in manifests.items():
        write_manifest(path, data_dir, total, compiled)
    return Setup(workdir, data_dir, manifests, total, args.warmup, cost.flops_per_token, peak)


def prepare_data(workdir: Path) -> Path:
    out = workdir / "data"
    cmd = [str(BIN / "kubetrain"), "prepare", "--input", "corpus://shakespeare", "--train-tokenizer", "8000",
           "--validation-split", "0.05", "--output", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def run_tps(res: dict, warmup: int) -> float:
    """Median tokens/s over the measured steps of one run (kubetrain: its own per-step number)."""
    if "tokensPerSecond" in res:
        return statistics.median(res["tokensPerSecond"][warmup:])
    return statistics.median(TOKENS_PER_STEP / s for s in res["stepSeconds"][warmup:])


def rounds(setup: Setup, contenders: list[tuple[str, str]], n_rounds: int, retries: int) -> dict[str, list[dict]]:
    """Every contender once per round, in plan order; the raw result of each run, by contender."""
    raw: dict[str, list[dict]] = {key: [] for key, _ in contenders}
    for r in range(n_rounds):
        for key, label in contenders:
            t0 = time.perf_counter()
            res = least_contended(setup, key, label, retries)
            raw[key].append(res)
            if "error" in res:
                print(f"  round {r + 1}: {label}: FAILED: {res['error'].strip().splitlines()[-1]}", flush=True)
            else:
                print(f"  round {r + 1}: {label}: {run_tps(res, setup.warmup):,.0f} tokens/s (other load "
                      f"{res['contention']:.0%}; {time.perf_counter() - t0:.0f}s)", flush=True)
    return raw


def least_contended(setup: Setup, key: str, label: str, retries: int) -> dict:
    """One run of `key`, measured again (at most `retries` times) while other processes took more than
    CONTENDED of the machine; the least contended attempt that did not fail is kept."""
    from _machine import CpuMeter, wait_idle

    res: dict = {}
    for attempt in range(1 + retries):
        wait_idle(log=lambda m: print(m, flush=True))
        with CpuMeter() as meter:
            this = measure(setup, key)
        this["contention"] = meter.result.foreign_share
        if not res or "error" in res or ("error" not in this and this["contention"] < res["contention"]):
            res = this
        if "error" in this or this["contention"] <= CONTENDED:
            break
        if attempt < retries:
            print(f"  {label}: {meter.result.describe()} during the run; measuring again", flush=True)
    return res


def measure(setup: Setup, key: str) -> dict:
    """One run of one contender; a failure comes back as {"error": ...}."""
    if key.startswith("kt"):
        out = setup.workdir / f"run-{key}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh output: an old checkpoint would be resumed
        try:
            res = run_kubetrain(setup.manifests[key.endswith("c")], out, int(key[2]), setup.total)
        except RuntimeError as exc:
            res = {"error": str(exc)}
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return res
    return run_worker(key, setup.data_dir, setup.total, timeout=900 if key.startswith("bare-") else 600)


def run_worker(kind: str, data_dir: Path, total: int, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = Path(fh.name)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, str(SCRIPT), "--worker", kind, "--data", str(data_dir), "--total", str(total),
           "--result", str(result_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return dict(result)


def usable(raw: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Runs that other processes disturbed (>5% of the machine) are left out when the contender has clean ones."""
    ok = {}
    for key, runs in raw.items():
        good = [x for x in runs if "error" not in x]
        clean = [x for x in good if x["contention"] <= CONTENDED]
        ok[key] = clean or good
    return ok
