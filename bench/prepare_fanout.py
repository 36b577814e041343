"""Fan-out of the cluster's data preparation stage (`python -m kubetrain_trainer.prepare_stage`) over processes.

The stage a job with `preparation.parts: N` runs is: one `tokenizer` step, N `part` steps at once (an Indexed
Job: each tokenises every N-th input file into its own shards), then one `merge` (one index over every
part's shards, the marker last). Here the same command lines run as local processes, timed per phase, on the
10x corpus of bench/prepare_throughput.py (each of the 42 plays written 10 times, ~54 MB):

  1 part  x 1 thread     the baseline: what one core does
  1 part  x T threads    one pod with all T cores of this machine (RAYON_NUM_THREADS=T)
  N parts x T/N threads  N pods sharing the machine's T cores (N = 2 on a 2-core machine)

Scaling efficiency = tokens/s of N parts ÷ (N × tokens/s of one part with one thread): 1.0 is linear in
processes, each on its own core. Every configuration runs `--repeats` times, interleaved; medians are reported.
The tokenizer step (the same tokenizer for all: `tokenizer.path` of one trained on the plays once) is
timed but is not part of the fan-out.

    .venv/bin/python bench/prepare_fanout.py [--scale 10] [--repeats 3] [--json FILE]
"""

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import code_version, wait_idle
from prepare_throughput import make_scaled_corpus

STAGE = [sys.executable, "-m", "kubetrain_trainer.prepare_stage"]


def write_config(path: Path, train: Path, tokenizer: dict) -> Path:
    spec = {"tokenizer": tokenizer, "data": {"train": str(train), "validationSplit": 0.05, "seqLength": 256}}
    path.write_text(json.dumps(spec))
    return path


def stage(config: Path, location: Path, step: str, threads: int, part: int = 0, parts: int = 1,
          ) -> subprocess.Popen:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env.pop("TOKENIZERS_PARALLELISM", None)
    cmd = [*STAGE, "--config", str(config), "--to", str(location), "--step", step, "--part", str(part),
           "--parts", str(parts), "--workdir", str(location.parent / f"scratch-{location.name}-{part}")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{' '.join(p.args)} exited {p.returncode}:\n{out[-2000:]}")


def tokens_written(location: Path) -> int:
    marker = json.loads((location / "PREPARED.json").read_text())
    return int(sum(marker["stats"]["tokens"].values()))


def one_run(config: Path, root: Path, parts: int, threads: int) -> dict:
    """tokenizer (a copy), N parts at once, merge: each phase's wall time, and the tokens written."""
    location = root / f"out-{parts}x{threads}"
    shutil.rmtree(location, ignore_errors=True)
    t0 = time.perf_counter()
    finish([stage(config, location, "tokenizer", threads)])
    t1 = time.perf_counter()
    finish([stage(config, location, "part", threads, i, parts) for i in range(parts)])
    t2 = time.perf_counter()
    finish([stage(config, location, "merge", threads, parts=parts)])
    t3 = time.perf_counter()
    tokens = tokens_written(location)
    shutil.rmtree(location, ignore_errors=True)
    return {"parts": parts, "threads": threads, "tokenizerSeconds": t1 - t0, "partsSeconds": t2 - t1,
            "mergeSeconds": t3 - t2, "tokens": tokens, "tokensPerSecond": tokens / (t3 - t1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=10, help="copies of the plays in the corpus")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from kubetrain_trainer.preparation import resolve_inputs

    cores = len(os.sched_getaffinity(0))
    root = Path(tempfile.mkdtemp(prefix="kubetrain-bench-fanout-"))
    corpus = make_scaled_corpus(resolve_inputs("corpus://shakespeare", "data.train"), args.scale, root / "corpus")
    mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
    print(f"machine: {cores} CPUs; code: {code_version()}; corpus: {args.scale}x the plays, {mb:.0f} MB in "
          f"{len(list(corpus.iterdir()))} files", flush=True)

    trained = root / "trained"  # one tokenizer for every configuration
    config = write_config(root / "train-tokenizer.json", corpus, {"train": {"vocabSize": 8000}})
    t0 = time.perf_counter()
    finish([stage(config, trained, "tokenizer", cores)])
    print(f"tokenizer: trained once ({time.perf_counter() - t0:.1f}s, {cores} threads); every run copies it",
          flush=True)
    config = write_config(root / "stage.json", corpus, {"path": str(trained / "tokenizer")})

    layouts = [(1, 1), (1, cores)] + [(n, max(1, cores // n)) for n in (2, 4) if n <= cores]
    runs: dict[tuple[int, int], list[dict]] = {lay: [] for lay in layouts}
    for r in range(args.repeats):
        for parts, threads in layouts:
            wait_idle(log=lambda m: print(m, flush=True))
            res = one_run(config, root, parts, threads)
            runs[(parts, threads)].append(res)
            print(f"  round {r + 1}: {parts} part(s) x {threads} thread(s): {res['tokensPerSecond']:,.0f} tokens/s "
                  f"(parts {res['partsSeconds']:.1f}s, merge {res['mergeSeconds']:.1f}s)", flush=True)

    def med(lay: tuple[int, int], key: str) -> float:
        return statistics.median(x[key] for x in runs[lay])

    base = med((1, 1), "tokensPerSecond")
    print("\n| parts x threads | tokens/s | vs 1 x 1 | scaling efficiency | parts phase s | merge s | "
          "tokenizer copy s |\n|---|---:|---:|---:|---:|---:|---:|")
    for lay in layouts:
        parts, threads = lay
        tps = med(lay, "tokensPerSecond")
        workers = parts * threads
        print(f"| {parts} x {threads} | {tps:,.0f} | {tps / base:.2f}x | {tps / (base * workers):.2f} "
              f"(over {workers} core(s)) | {med(lay, 'partsSeconds'):.1f} | {med(lay, 'mergeSeconds'):.2f} | "
              f"{med(lay, 'tokenizerSeconds'):.2f} |")
    tokens = {x["tokens"] for rs in runs.values() for x in rs}
    print(f"\ntokens written: {sorted(tokens)} (the same for every layout: the parts split files, not documents)")
    if args.json:
        args.json.write_text(json.dumps({f"{p}x{t}": rs for (p, t), rs in runs.items()}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
