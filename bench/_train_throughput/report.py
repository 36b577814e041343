"""The printed results: the table of tokens/s and MFU, a note per contender, and the issue's targets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import CONTENDED
from .driver import TOKENS_PER_STEP, Setup, run_tps


@dataclass
class Results:
    setup: Setup
    plan: list[tuple[str, str]]
    rounds: int
    raw: dict[str, list[dict]]  # every run
    ok: dict[str, list[dict]]  # the runs used
    tps: dict[str, float | None]  # by contender: the median over the runs used

    def ratio_base(self) -> tuple[float | None, float | None]:
        return self.tps["bare"], self.tps["hf"]


def print_table(res: Results) -> None:
    base, hf = res.ratio_base()
    warmup = res.setup.warmup
    head = (f"| {'contender':<48} | {'tokens/s':>9} | {'range':>13} | {'n':>2} | {'vs bare':>7} | {'vs Trainer':>10} | "
            f"{'MFU':>6} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for key, label in res.plan:
        t = res.tps[key]
        if t is None:
            print(f"| {label:<48} | {'failed':>9} | {'':>13} | {'':>2} | {'':>7} | {'':>10} | {'':>6} |")
            continue
        each = [run_tps(x, warmup) for x in res.ok[key]]
        rng = f"{min(each):,.0f}..{max(each):,.0f}"
        vb = f"{t / base:.2f}x" if base else "-"
        vh = f"{t / hf:.2f}x" if hf else "-"
        print(f"| {label:<48} | {t:>9,.0f} | {rng:>13} | {len(each):>2} | {vb:>7} | {vh:>10} | "
              f"{t * res.setup.flops_per_token / res.setup.peak:>6.1%} |")


def print_notes(res: Results) -> None:
    print("\nnotes (last run used of each):")
    for key, label in res.plan:
        if not res.ok[key]:
            print(f"  {label}: failed: {res.raw[key][-1]['error'].strip()[-500:]}")
            continue
        print(f"  {label}: {_note(res, key)}")
    base, hf = res.ratio_base()
    if res.rounds > 1 and base and hf:
        _print_round_ratios(res)


def _note(res: Results, key: str) -> str:
    """How the last run used of `key` ran, its loss, and how contended its runs were."""
    run = res.ok[key][-1]
    warmup = res.setup.warmup
    if key.startswith("kt"):
        wall_tps = statistics.median(TOKENS_PER_STEP / g for g in run["eventGaps"][warmup:])
        own_mfu = statistics.median(run["mfu"][warmup:])
        note = (f"{run['parallelism']} x {run['worldSize']}, {run['threads']} thread(s)/proc; wall time between "
                f"step events {wall_tps:,.0f} tok/s; its own MFU figure {own_mfu:.1%} (peak it measured "
                f"{run['peakFlops'] / 1e9:.0f} GFLOP/s x {run['worldSize']})")
        if run["failure"]:
            note += f"; ALL STEPS RAN, BUT THE RUN THEN FAILED ({run['failure']})"
    else:
        note = f"{run['threads']} threads"
        if run.get("compileSeconds"):
            note += f"; first (compiling) step {run['compileSeconds']:.0f}s"
    loss = run.get("meanLoss") or statistics.fmean(run["losses"])
    worst = max(x["contention"] for x in res.ok[key])
    dropped = len([x for x in res.raw[key] if "error" not in x]) - len(res.ok[key])
    note += f"; mean train loss {loss:.3f}; other load during the runs used <= {worst:.0%}"
    if dropped:
        note += f"; {dropped} disturbed run(s) left out"
    if worst > CONTENDED:
        note += " (CONTENDED: treat with suspicion)"
    return note


def _print_round_ratios(res: Results) -> None:
    """kubetrain vs Trainer within each round: both measured under the same conditions."""
    labels = dict(res.plan)
    warmup = res.setup.warmup

    def mark(a: dict, b: dict) -> str:
        return "*" if max(a["contention"], b["contention"]) > CONTENDED else ""

    print("  per-round ratios (same round; * = a disturbed run): " + "; ".join(
        f"{labels[k].split(' (')[0]} vs Trainer "
        + "/".join(f"{run_tps(a, warmup) / run_tps(b, warmup):.2f}{mark(a, b)}"
                   for a, b in zip(res.raw[k], res.raw["hf"], strict=True) if "error" not in a and "error" not in b)
        for k in ("kt2", "kt1")))


def print_targets(res: Results) -> None:
    labels = dict(res.plan)
    base, hf = res.ratio_base()
    print("\ntargets (issue): kubetrain >= 1.05x transformers.Trainer and >= 0.97x the bare loop")
    for key in ("kt2", "kt1"):
        t = res.tps[key]
        if t and base and hf:
            print(f"  {labels[key]}: vs Trainer {t / hf:.3f}x {'MET' if t / hf >= 1.05 else 'MISSED'}; "
                  f"vs bare {t / base:.3f}x {'MET' if t / base >= 0.97 else 'MISSED'}")
