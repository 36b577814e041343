"""Where kubetrain_trainer.preparation.prepare spends its time: cProfile of the main thread plus timing of
every tokenizer call (which runs in prepare's worker thread, outside cProfile's view).

    .venv/bin/python bench/profile_prepare.py [--input corpus://shakespeare] [--tokenizer DIR] [--top 12]

Prints the wall time, the tokenizer's busy time and the time before the first / after the last
tokenizer call (the serial parts no overlap can hide), then the main thread's heaviest functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TimedBackend:
    """Forwards to the Rust tokenizer; records (start, end, documents) of every batch encode."""

    def __init__(self, backend: Any, calls: list[tuple[float, float, int]]):
        self._backend, self._calls = backend, calls

    def _timed(self, name: str, batch: list[str], **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = getattr(self._backend, name)(batch, **kw)
        self._calls.append((t0, time.perf_counter(), len(batch)))
        return out

    def encode_batch_fast(self, batch: list[str], **kw: Any) -> Any:
        return self._timed("encode_batch_fast", batch, **kw)

    def encode_batch(self, batch: list[str], **kw: Any) -> Any:
        return self._timed("encode_batch", batch, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class TimedTokenizer:
    def __init__(self, tok: Any, calls: list[tuple[float, float, int]]):
        self._tok, self._backend = tok, TimedBackend(tok.backend_tokenizer, calls)

    @property
    def backend_tokenizer(self) -> TimedBackend:
        return self._backend

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@dataclass
class Profiled:
    """One prepare run under cProfile, with every tokenizer call's (start, end, documents)."""

    files: list[Path]
    stats: Any  # prepare's PrepareStats
    prof: cProfile.Profile
    calls: list[tuple[float, float, int]]
    t0: float  # perf_counter() at the start of prepare
    wall: float
    contention: str


def profile(args: argparse.Namespace, scratch: Path) -> Profiled:
    from _machine import CpuMeter, wait_idle
    from kubetrain_trainer.preparation import iter_training_texts, prepare, resolve_inputs
    from kubetrain_trainer.tokenizer import load_tokenizer, train_bpe

    files = resolve_inputs(args.input, "--input")
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        train_bpe(iter_training_texts(files, "text", 0.05, 500_000_000), 8000).save_pretrained(str(scratch / "tok"))
        tok = load_tokenizer(scratch / "tok")  # a fresh load: no warm BPE cache from training
    calls: list[tuple[float, float, int]] = []
    timed = TimedTokenizer(tok, calls)

    wait_idle()
    prof = cProfile.Profile()
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        prof.enable()
        stats = prepare(files, timed, scratch / "out", validation_split=0.05)
        prof.disable()
        wall = time.perf_counter() - t0
    return Profiled(files, stats, prof, calls, t0, wall, meter.result.describe())


def print_timeline(p: Profiled) -> None:
    """The tokenizer's busy time and the serial head and tail that no overlap can hide."""
    tokens = sum(p.stats.tokens.values())
    calls, t0, wall = p.calls, p.t0, p.wall
    busy = sum(e - s for s, e, _ in calls)
    first, last = min(s for s, _, _ in calls) - t0, wall - (max(e for _, e, _ in calls) - t0)
    print(f"prepare: {tokens:,} tokens in {wall:.3f}s = {tokens / wall:,.0f} tokens/s "
          f"({len(p.files)} files, {p.stats.characters / 1e6:.1f}M characters; under cProfile; "
          f"{p.contention})")
    print(f"tokenizer calls (worker thread): {len(calls)} batches "
          f"({', '.join(str(n) for *_, n in calls)} documents), busy {busy:.3f}s = {busy / wall:.0%} of wall; "
          f"alone that is {tokens / busy:,.0f} tokens/s")
    print(f"  serial head (before the first tokenizer call): {first:.3f}s = {first / wall:.0%} of wall")
    print(f"  serial tail (after the last tokenizer call):   {last:.3f}s = {last / wall:.0%} of wall")
    for i, (s, e, n) in enumerate(calls):
        print(f"  batch {i}: {s - t0:.3f}s .. {e - t0:.3f}s ({e - s:.3f}s, {n} documents)")


def print_heaviest(p: Profiled, top: int) -> None:
    wall = p.wall
    print(f"\nmain thread, by cumulative time (share of {wall:.3f}s wall):")
    st = pstats.Stats(p.prof)
    rows = []
    for (filename, line, func), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((ct, tt, f"{Path(filename).name}:{line}({func})"))
    rows.sort(reverse=True)
    print(f"  {'cumulative':>10} {'share':>6} {'own':>8}  function")
    for ct, tt, name in rows[:top]:
        print(f"  {ct:>9.3f}s {ct / wall:>6.0%} {tt:>7.3f}s  {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="corpus://shakespeare")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: train an 8000 BPE first)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "2")

    scratch = Path(tempfile.mkdtemp(prefix="kubetrain-profile-prepare-"))
    profiled = profile(args, scratch)
    print_timeline(profiled)
    print_heaviest(profiled, args.top)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
