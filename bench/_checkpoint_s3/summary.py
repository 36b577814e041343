"""Medians over the repeats, the ratios against the baselines, and the table of aims."""

from __future__ import annotations

import statistics
from typing import Any

from . import MB


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    reps = results["repeats"]
    blocked_async = [r["async"]["blocked"] for r in reps]
    warm = blocked_async[1:] or blocked_async
    s = {
        "blocked_async": median(warm), "blocked_async_first": blocked_async[0],
        "blocked_async_all": median(blocked_async),
        "blocked_sync": median([r["sync"]["blocked"] for r in reps]),
        "local_save": median([r["sync"]["local_save"] for r in reps]),
        "total_async": median([r["async"]["total"] for r in reps]),
        "write_mbps": median([r["async"]["bytes"] / MB / r["async"]["write"] for r in reps]),
        "end_to_end_mbps": median([r["async"]["bytes"] / MB / r["async"]["total"] for r in reps]),
        "upload_file_mbps": median([r["sync"]["bytes"] / MB / r["sync"]["upload"] for r in reps]),
        "split_mbps": median([r["split"]["bytes"] / MB / r["split"]["upload"] for r in reps]),
        "load": median([r["load"]["total"] for r in reps]),
        "dl_load": median([r["dl_load"]["total"] for r in reps]),
        "download": median([r["dl_load"]["download"] for r in reps]),
        "download_mbps": median([r["dl_load"]["bytes"] / MB / r["dl_load"]["download"] for r in reps]),
        "max_foreign": max(max(r[k]["foreign"] for k in ("async", "sync", "split", "load", "dl_load")) for r in reps),
    }
    s["ratio_blocked"] = s["blocked_async"] / s["blocked_sync"]
    s["ratio_blocked_first"] = s["blocked_async_first"] / s["blocked_sync"]
    s["best_upload_mbps"] = max(s["upload_file_mbps"], s["split_mbps"])  # judge against the faster baseline
    s["ratio_throughput"] = s["write_mbps"] / s["best_upload_mbps"]
    s["ratio_throughput_end_to_end"] = s["end_to_end_mbps"] / s["best_upload_mbps"]
    s["ratio_throughput_one_object"] = s["write_mbps"] / s["upload_file_mbps"]
    s["ratio_throughput_split"] = s["write_mbps"] / s["split_mbps"]
    s["ratio_load"] = s["load"] / s["dl_load"]
    # the same ratio taken within each repeat (both contenders under the same conditions), then the median
    s["ratio_throughput_paired"] = median([
        (r["async"]["bytes"] / r["async"]["write"])
        / max(r["sync"]["bytes"] / r["sync"]["upload"], r["split"]["bytes"] / r["split"]["upload"]) for r in reps])
    return s


def table(results: dict[str, Any], s: dict[str, Any]) -> str:
    n = len(results["repeats"])

    def ok(met: bool) -> str:
        return "met" if met else "MISSED"

    rows = [
        ("training blocked per checkpoint (s)*", f"{s['blocked_async']:.3f}", f"{s['blocked_sync']:.2f}",
         f"{s['ratio_blocked']:.3f}x", "<= 0.05x", ok(s["ratio_blocked"] <= 0.05)),
        ("  first save of the run", f"{s['blocked_async_first']:.3f}", f"{s['blocked_sync']:.2f}",
         f"{s['ratio_blocked_first']:.3f}x", "<= 0.05x", ok(s["ratio_blocked_first"] <= 0.05)),
        ("upload throughput vs the faster baseline (MB/s)", f"{s['write_mbps']:.1f}", f"{s['best_upload_mbps']:.1f}",
         f"{s['ratio_throughput']:.2f}x", ">= 0.9x", ok(s["ratio_throughput"] >= 0.9)),
        ("  the same, per repeat (median of the repeats' ratios)", "", "", f"{s['ratio_throughput_paired']:.2f}x",
         ">= 0.9x", ok(s["ratio_throughput_paired"] >= 0.9)),
        ("  vs upload_file, one object", f"{s['write_mbps']:.1f}", f"{s['upload_file_mbps']:.1f}",
         f"{s['ratio_throughput_one_object']:.2f}x", "", ""),
        ("  vs TransferManager, same object sizes", f"{s['write_mbps']:.1f}", f"{s['split_mbps']:.1f}",
         f"{s['ratio_throughput_split']:.2f}x", "", ""),
        ("  end to end incl. staging (MB/s)", f"{s['end_to_end_mbps']:.1f}", f"{s['best_upload_mbps']:.1f}",
         f"{s['ratio_throughput_end_to_end']:.2f}x", ">= 0.9x", ok(s["ratio_throughput_end_to_end"] >= 0.9)),
        ("resume load time (s)", f"{s['load']:.2f}", f"{s['dl_load']:.2f}", f"{s['ratio_load']:.2f}x",
         "<= 1.0x", ok(s["ratio_load"] <= 1.0)),
        ("total save time, async until committed (s)", f"{s['total_async']:.2f}", "", "", "", ""),
    ]
    head = (f"metric (median of {n})", "kubetrain", "baseline", "ratio", "aim", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(6)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"* saves 2..N (median of {max(1, n - 1)}); the first save of the run is on the next line. "
                 f"The host buffers were allocated before it ({results.get('prepare_seconds', 0):.2f}s, in the "
                 "background, as the trainer does after its first step).")
    return "\n".join(lines)
