"""Issue 4's aims and the printed report: one block per run, then the aims over all runs."""

from __future__ import annotations

from typing import Any

import psutil

from .target import CONTROL_PLANE

DISTURBED = 0.10  # other processes' share of the machine above which a run is measured again
AIMS = {"seconds_to_all_pods": 4.0, "ratio_to_bare": 0.5, "status_converged_seconds": 3.0,
        "operator_peak_rss_mib": 250.0}


def aims(run: dict[str, Any], pods: int) -> dict[str, tuple[float | None, bool | None]]:
    """Each aim: (value, met); the 4 s aim is for 1,600 pods (None elsewhere)."""
    op = run["operator"]
    values = {"seconds_to_all_pods": op.get("seconds_to_all_pods"), "ratio_to_bare": run["ratio_to_bare"],
              "status_converged_seconds": op.get("status_converged_seconds"),
              "operator_peak_rss_mib": op.get("operator_peak_rss_mib")}
    out: dict[str, tuple[float | None, bool | None]] = {}
    for key, value in values.items():
        if key == "seconds_to_all_pods" and pods != 1600:
            out[key] = (value, None)
        elif value is None:
            out[key] = (None, False)
        else:
            out[key] = (value, value >= AIMS[key] if key == "ratio_to_bare" else value <= AIMS[key])
    return out


def _cpu(c: dict[str, float]) -> str:
    parts = [f"{k} {c[k]:.1f}" for k in ("operator", *CONTROL_PLANE, "bench", "others") if k in c]
    capacity = c["wall"] * (psutil.cpu_count() or 1)
    return (f"{c['wall']:.1f} s wall, CPU s: " + ", ".join(parts)
            + f" (machine {100 * c['machine'] / capacity:.0f}% busy, others {100 * c['others'] / capacity:.0f}%)")


def report_run(run: dict[str, Any], jobs: int, workers: int) -> str:
    pods = jobs * workers
    lines = _outcome_lines(run, jobs, workers, pods) + _cost_lines(run)
    if run.get("disturbed"):
        lines.append(f"  DISTURBED: other processes took {100 * run['others_share']:.0f}% of the machine in a timed "
                     f"phase (> {100 * DISTURBED:.0f}%)")
    return "\n".join(lines)


def _outcome_lines(run: dict[str, Any], jobs: int, workers: int, pods: int) -> list[str]:
    """The rates, the convergence and the RSS, each against its aim."""
    bare, op = run["bare"], run["operator"]
    met = aims(run, pods)

    def mark(key: str) -> str:
        flag = met[key][1]
        return "" if flag is None else (" MET" if flag else " MISSED")

    first, second = run["order"]
    lines = [f"run {run['run']}, attempt {run['attempt']} ({first} first, {second} second): {jobs} jobs × {workers} "
             f"workers = {pods} pods",
             f"  bare aiohttp client   {bare['pods_per_second']:8.0f} pods/s, all {pods} in {bare['seconds']:.2f} s",
             f"  operator              {op['pods_per_second']:8.0f} pods/s = {run['ratio_to_bare']:.2f}× bare "
             f"(aim ≥ 0.5×{mark('ratio_to_bare')}); "
             + (f"all {pods} in {op['seconds_to_all_pods']:.2f} s (aim ≤ 4 s for 1,600{mark('seconds_to_all_pods')})"
                if op.get("seconds_to_all_pods") is not None else
                f"only {op['pods_created']} created within the timeout{mark('seconds_to_all_pods')}")]
    if op.get("seconds_to_all_pods") is not None:
        lines.append(f"  pods listed           {op['pods_listed']} (pods added {op.get('pods_total_created')}, "
                     f"operator counted {op['pods_created']} creates, "
                     f"{op['pods_deleted']} deletes, {op['operator_restarts']} restarts, {op['operator_errors']} "
                     "errors)")
    conv = op.get("status_converged_seconds")
    lines.append("  status                not converged within the timeout" if conv is None else
                 f"  status converged      {conv:.2f} s after the last pod change (aim ≤ 3 s"
                 f"{mark('status_converged_seconds')}; the {pods} status patches took "
                 f"{op['status_patches_seconds']:.2f} s)")
    lines.append(f"  operator peak RSS     {op['operator_peak_rss_mib']:.0f} MiB (aim ≤ 250 MiB"
                 f"{mark('operator_peak_rss_mib')})")
    return lines


def _cost_lines(run: dict[str, Any]) -> list[str]:
    """CPU and API requests per timed phase: what each contender cost the machine and the server."""
    bare, op = run["bare"], run["operator"]
    lines = [f"  CPU, bare creates     {_cpu(bare['cpu_seconds'])}"]
    if "cpu_seconds_creating" in op:
        lines.append(f"  CPU, operator creates {_cpu(op['cpu_seconds_creating'])}")
    if "cpu_seconds_converging" in op:
        lines.append(f"  CPU, patches+converge {_cpu(op['cpu_seconds_converging'])}")
    for label, api in (("bare creates", bare.get("api")), ("operator creates", op.get("api_creating")),
                       ("patches+converge", op.get("api_converging"))):
        if api:
            lines.append(f"  API, {label + ':':17s} " + ", ".join(f"{k} {v}" for k, v in api.items()))
    return lines


def report(result: dict[str, Any]) -> str:
    pods = result["jobs"] * result["workers"]
    lines = [f"{result['target']}; {result['cpus']} CPUs; concurrency {result['concurrency']}"]
    for run in result["runs"]:
        lines.append(report_run(run, result["jobs"], result["workers"]))
        for other in run.get("disturbed_attempts") or []:
            share = 100 * other["others_share"]
            lines.append(f"  (attempt {other['attempt']} left out: other processes took {share:.0f}% of the machine; "
                         f"it measured {other['ratio_to_bare']:.2f}× bare)")
    names = {"seconds_to_all_pods": "all pods created ≤ 4 s", "ratio_to_bare": "≥ 0.5× the bare client",
             "status_converged_seconds": "status converged ≤ 3 s", "operator_peak_rss_mib": "operator RSS ≤ 250 MiB"}
    lines.append("aims:")
    for key, name in names.items():
        got = [aims(run, pods)[key] for run in result["runs"]]
        values = ", ".join("-" if v is None else f"{v:.2f}" for v, _ in got)
        flags = [m for _, m in got]
        verdict = ("n/a (not 1,600 pods)" if all(m is None for m in flags) else
                   "met in every run" if all(flags) else "missed in every run" if not any(flags) else
                   f"met in {sum(bool(m) for m in flags)} of {len(flags)} runs")
        lines.append(f"  {name:28s} {verdict} ({values})")
    return "\n".join(lines)
