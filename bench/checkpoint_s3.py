"""Checkpoints to S3: kubetrain's asynchronous streaming save and ranged-read resume vs. the plain
"save locally, then upload / download, then load" way, in one run against one `moto_server`.

Model: the `llama-125m` preset with a 32000 vocabulary (134.1M parameters, 109.5M without the input
embedding), fp32 on CPU, after one AdamW step (TrainingSpec defaults) on a tiny random batch so that
the optimizer state exists: 1.61 GB of model + AdamW state per checkpoint. One process,
torch.distributed initialised with gloo (world size 1, HashStore), as `kubetrain run` does locally.

Before the repeats, one untimed warm-up upload (the first upload into a fresh moto_server is slower for
anyone). Per repeat (same model, same server, same S3 settings, same boto3 client configuration), the
kubetrain save and the two baseline uploads take turns going first (ABBA), then the two loads:

  async     CheckpointManager(S3Store("s3://bench/async/")).save(step, ..., asynchronous=True): the seconds
            it returns are the training time blocked (state dicts + copy into reused host buffers);
            wait() then returns the SaveResult (total seconds until COMMITTED, bytes written).
  sync      the baseline "synchronous save-then-upload": dcp.save of the same state dict
            (get_model_state_dict / get_optimizer_state_dict) to a fresh local directory with
            FileSystemWriter, then boto3 upload_file of every file (TransferConfig with the same part
            size and max_concurrency). Training is blocked for all of it.
  split     a second upload baseline: the same bytes cut (untimed) into files of kubetrain's object size,
            all handed at once to one boto3 TransferManager (same part size and concurrency).
  load      CheckpointManager.load(step, model, optimizer): parallel ranged GETs straight into the
            tensors (S3Reader), nothing copied locally.
  dl+load   the baseline resume: boto3 download_file (same TransferConfig) of the sync baseline's
            whole-file objects into a fresh local directory, then dcp.load with FileSystemReader and
            set_model_state_dict / set_optimizer_state_dict, exactly as CheckpointManager.load does.

Ratios: blocked_async / blocked_sync (aim <= 0.05), streaming write throughput / the faster of the two
upload baselines of the same bytes (aim >= 0.9; also shown as the median of each repeat's own ratio),
load / dl+load (aim <= 1.0). Each phase also reports the server's CPU seconds. Medians over --repeats;
the host staging buffers are allocated before the first save (CheckpointManager.prepare, which the
trainer runs in the background after its first step); the blocked-time headline is the median of
saves 2..N and the first save is shown on its own line.
Before measuring, the script waits (up to --max-wait s) for the 1-minute load average to drop to
--max-load, and it reports the CPU that other processes took during each phase.

    .venv/bin/python bench/checkpoint_s3.py [--repeats 2] [--part-mib 32] [--object-mib 256]
                                            [--concurrency 8] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

# The parts live in bench/_checkpoint_s3/, one concern per module (its __init__ lists them).
from _checkpoint_s3.run import run
from _checkpoint_s3.summary import summarise, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--part-mib", type=int, default=32)
    ap.add_argument("--object-mib", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--baseline-part-mib", type=int, default=None,
                    help="part size of the boto3 baseline's TransferConfig (default: --part-mib)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-minute load is at most this")
    ap.add_argument("--max-wait", type=float, default=600.0)
    ap.add_argument("--tmp", default=None, help="where the temp dir (local checkpoints, moto's files) goes")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    results = run(args)
    s = summarise(results)
    results["summary"] = s
    print()
    print(table(results, s))
    print(f"\nbaseline parts: local dcp.save {s['local_save']:.2f}s; download_file {s['download']:.2f}s "
          f"({s['download_mbps']:.1f} MB/s). moto peak RSS {results['moto_peak_rss_gb']:.1f} GB; "
          f"incomplete multipart uploads left: {results['leftover_uploads']}. 1-minute load before: "
          f"{results['loadavg_before']:.2f}; most CPU other processes took during a phase: "
          f"{s['max_foreign']:.0%} of the machine. Whole run {time.perf_counter() - t0:.0f}s.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
