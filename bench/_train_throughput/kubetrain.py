"""kubetrain as users run it: a manifest, `kubetrain run job.yaml --nproc N`, and its events.jsonl read back."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from pathlib import Path

from . import BETAS, BIN, CLIP, EVAL_SEQUENCES, GLOBAL, LR, MICRO, MIN_LR_RATIO, REPO, SEED, SEQ, WEIGHT_DECAY
from .workers import lr_warmup


def write_manifest(path: Path, data_dir: Path, total: int, compile_blocks: bool) -> None:
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
                "evalEvery": 0, "evalBatches": EVAL_SEQUENCES // GLOBAL, "seed": SEED,
                # Set: at 45 steps `compile` unset would not compile (it does from 1000 steps on).
                "compile": compile_blocks,
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
    compiled = next((e for e in events if e["type"] == "compile"), None)
    final_eval = [e for e in events if e["type"] == "eval"][-1]
    # Wall time between consecutive step events: also counts what happens outside the trainer's own
    # step timer (event/metrics bookkeeping); the first step has no predecessor and is skipped.
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(steps)]
    return {"stepSeconds": [e["seconds"] for e in steps], "tokensPerSecond": [e["tokensPerSecond"] for e in steps],
            "mfu": [e["mfu"] for e in steps], "losses": [e["loss"] for e in steps], "eventGaps": gaps,
            "parallelism": start["parallelism"], "worldSize": start["worldSize"], "threads": start["threads"],
            "peakFlops": start["peakFlops"], "commandSeconds": wall, "command": " ".join(cmd), "failure": failure,
            "validationLoss": final_eval["loss"], "validationStep": final_eval["step"],
            "compileSeconds": compiled["firstStepSeconds"] if compiled else None}
