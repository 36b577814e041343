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
        return self.tps.get("bare"), self.tps.get("hf")


def validation_loss(res: Results, key: str) -> float | None:
    """The median validation loss after the run over the runs used (the same weights and batches every run)."""
    runs = [x["validationLoss"] for x in res.ok[key] if x.get("validationLoss") is not None]
    return statistics.median(runs) if runs else None


def print_table(res: Results) -> None:
    base, hf = res.ratio_base()
    hf_val = validation_loss(res, "hf") if "hf" in res.ok else None
    warmup = res.setup.warmup
    head = (f"| {'contender':<54} | {'tokens/s':>9} | {'range':>13} | {'n':>2} | {'vs bare':>7} | {'vs Trainer':>10} | "
            f"{'MFU':>6} | {'val loss':>8} | {'vs Trainer':>10} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for key, label in res.plan:
        t = res.tps[key]
        if t is None:
            print(f"| {label:<54} | {'failed':>9} | {'':>13} | {'':>2} | {'':>7} | {'':>10} | {'':>6} | {'':>8} | "
                  f"{'':>10} |")
            continue
        each = [run_tps(x, warmup) for x in res.ok[key]]
        rng = f"{min(each):,.0f}..{max(each):,.0f}"
        vb = f"{t / base:.3f}x" if base else "-"
        vh = f"{t / hf:.3f}x" if hf else "-"
        val = validation_loss(res, key)
        val_text = f"{val:.4f}" if val is not None else "-"
        val_ratio = f"{val / hf_val - 1:+.2%}" if val is not None and hf_val else "-"
        print(f"| {label:<54} | {t:>9,.0f} | {rng:>13} | {len(each):>2} | {vb:>7} | {vh:>10} | "
              f"{t * res.setup.flops_per_token / res.setup.peak:>6.1%} | {val_text:>8} | {val_ratio:>10} |")


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
        if run.get("compileSeconds"):
            note += f"; first (compiling, cold cache) step {run['compileSeconds']:.1f}s"
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
        for k in ("kt2", "kt1", "kt2c", "kt1c") if k in res.raw))


def print_targets(res: Results) -> None:
    """Issue 14's aims, for kubetrain's path for long runs (compiled: `training.compile` unset compiles from
    1000 steps on), and for the uncompiled one for comparison."""
    labels = dict(res.plan)
    base, hf = res.ratio_base()
    compiled_bare = res.tps.get("bare-compile")
    hf_val = validation_loss(res, "hf") if "hf" in res.ok else None
    print("\naims (issue 14): kubetrain >= 1.10x transformers.Trainer, >= 1.0x the compiled bare loop, and its "
          "validation loss after the same tokens within 1% of the Trainer's")
    for key in ("kt2c", "kt1c", "kt2", "kt1"):
        t = res.tps.get(key)
        if not t or not hf:
            continue
        parts = [f"vs Trainer {t / hf:.3f}x {'MET' if t / hf >= 1.10 else 'MISSED'}"]
        if compiled_bare:
            parts.append(f"vs compiled bare loop {t / compiled_bare:.3f}x "
                         f"{'MET' if t / compiled_bare >= 1.0 else 'MISSED'}")
        if base:
            parts.append(f"vs bare loop {t / base:.3f}x")
        val = validation_loss(res, key)
        if val is not None and hf_val:
            gap = val / hf_val - 1
            parts.append(f"validation loss {val:.4f} vs Trainer {hf_val:.4f} ({gap:+.2%}) "
                         f"{'MET' if abs(gap) <= 0.01 else 'MISSED'}")
        print(f"  {labels[key]}: " + "; ".join(parts))
