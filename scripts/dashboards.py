"""Writes the Grafana dashboards charts/kubetrain/dashboards/*.json (`make manifests` runs it; a test fails when
the files drift). Panels are declared compactly here; queries use only metrics the trainer and the operator
export (tests/chart/test_monitoring.py runs every one against a real scrape).

Labels: training pods are scraped by the chart's PodMonitor, which adds `namespace`, `pod` and `job_name`
(from the pod label kubetrain.io/job-name). GPU panels read NVIDIA dcgm-exporter's metrics, whose `namespace`
and `pod` labels name the pod using the GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "charts" / "kubetrain" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'namespace="$namespace", job_name="$job_name"'
BY_JOB = "by (namespace, job_name)"
GPU = 'namespace="$namespace", pod=~"$job_name-worker-[0-9]+"'

# Goodput: training time that counts over wall time. Net steps gained over the range (a restart resumes from
# the last checkpoint, so the steps it loses are subtracted, and time spent down or blocked on checkpoints
# gains none) times the mean step time, over the range.
GOODPUT = (
    f"clamp_max(clamp_min(delta((max {BY_JOB} (kubetrain_step{{{J}}}))[$__range:$__interval]), 0)"
    f" * on (namespace, job_name) (sum {BY_JOB} (increase(kubetrain_step_duration_seconds_sum{{{J}}}[$__range]))"
    f" / sum {BY_JOB} (increase(kubetrain_step_duration_seconds_count{{{J}}}[$__range]))) / $__range_s, 1)"
)


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def panel(title: str, targets: list[dict[str, Any]], unit: str = "short", kind: str = "timeseries",
          description: str = "", width: int = 8) -> dict[str, Any]:
    return {"title": title, "type": kind, "description": description, "unit": unit, "targets": targets,
            "width": width}


def row(title: str) -> dict[str, Any]:
    return {"title": title, "type": "row"}


TRAINING = {
    "uid": "kubetrain-training-job",
    "title": "kubetrain / Training job",
    "description": "One LLMTrainingJob: progress, throughput, goodput, checkpoints, workers and GPUs.",
    "variables": [
        ("namespace", "label_values(kubetrain_step, namespace)"),
        ("job_name", 'label_values(kubetrain_step{namespace="$namespace"}, job_name)'),
    ],
    "panels": [
        row("Progress"),
        panel("Loss", [q(f"max(kubetrain_loss{{{J}}})", "train"), q(f"max(kubetrain_eval_loss{{{J}}})", "eval")],
              description="Training loss of the last step (mean over the global batch) and validation loss "
                          "at the last evaluation."),
        panel("Learning rate", [q(f"max(kubetrain_learning_rate{{{J}}})", "lr")]),
        panel("Gradient norm", [q(f"max(kubetrain_grad_norm{{{J}}})", "before clipping")]),
        panel("Step", [q(f"max(kubetrain_step{{{J}}})", "step"), q(f"max(kubetrain_max_steps{{{J}}})", "max steps")],
              kind="stat", width=6),
        panel("Goodput", [q(GOODPUT, "goodput")], unit="percentunit", kind="stat", width=6,
              description="Productive training time over wall time in the dashboard's range: net steps gained "
                          "(steps lost to a restart's resume are subtracted; time down, restarting or blocked on "
                          "checkpoints gains none) times the mean step time."),
        panel("Restarts", [q(f"max(kubetrain_operator_job_restarts{{{J}}})", "restarts")], kind="stat", width=6,
              description="Restarts counted toward runPolicy.maxRestarts (the job's status.restarts)."),
        panel("Workers", [q(f"max(kubetrain_operator_job_workers{{{J}, state=\"desired\"}})", "desired nodes"),
                          q(f"count(kubetrain_world_size{{{J}}})", "active nodes"),
                          q(f"max(kubetrain_world_size{{{J}}})", "processes")], kind="stat", width=6,
              description="Desired nodes (spec.workers.nodes), nodes serving metrics, and training processes."),
        row("Throughput"),
        panel("Tokens/s", [q(f"max(kubetrain_tokens_per_second{{{J}}})", "tokens/s (last step)"),
                           q(f"sum(rate(kubetrain_tokens_total{{{J}}}[$__rate_interval]))", "tokens/s (all nodes)")]),
        panel("Tokens/s per node", [q(f"sum by (pod) (rate(kubetrain_tokens_total{{{J}}}[$__rate_interval]))",
                                      "{{pod}}")]),
        panel("MFU", [q(f"max(kubetrain_mfu_ratio{{{J}}})", "MFU")], unit="percentunit",
              description="Model FLOPs utilisation of the last step against the devices' bf16 peak."),
        panel("Step time", [
            q(f"histogram_quantile(0.5, sum by (le) (rate(kubetrain_step_duration_seconds_bucket{{{J}}}"
              f"[$__rate_interval])))", "p50"),
            q(f"histogram_quantile(0.9, sum by (le) (rate(kubetrain_step_duration_seconds_bucket{{{J}}}"
              f"[$__rate_interval])))", "p90"),
            q(f"sum(rate(kubetrain_step_duration_seconds_sum{{{J}}}[$__rate_interval])) / "
              f"sum(rate(kubetrain_step_duration_seconds_count{{{J}}}[$__rate_interval]))", "mean"),
        ], unit="s"),
        panel("Data wait", [q(f"sum by (pod) (rate(kubetrain_data_wait_seconds_total{{{J}}}[$__rate_interval]))",
                              "{{pod}}")], unit="percentunit",
              description="Share of wall time spent waiting for batches (data loading, S3 reads)."),
        panel("Throughput vs its median", [
            q(f"max(kubetrain_tokens_per_second{{{J}}}) / quantile_over_time(0.5, "
              f"(max(kubetrain_tokens_per_second{{{J}}}))[$__range:$__interval])", "now / median")],
            unit="percentunit", description="KubetrainThroughputDropped fires below 70% (default)."),
        row("Checkpoints"),
        panel("Checkpoint time per save", [
            q(f"sum(increase(kubetrain_checkpoint_blocked_seconds_sum{{{J}}}[$__range])) / "
              f"sum(increase(kubetrain_checkpoint_blocked_seconds_count{{{J}}}[$__range]))",
              "blocked (training waits)"),
            q(f"sum(increase(kubetrain_checkpoint_save_seconds_sum{{{J}}}[$__range])) / "
              f"sum(increase(kubetrain_checkpoint_save_seconds_count{{{J}}}[$__range]))", "total (until committed)"),
        ], unit="s", kind="stat"),
        panel("Last committed step", [q(f"max(kubetrain_checkpoint_last_step{{{J}}})", "committed"),
                                      q(f"max(kubetrain_step{{{J}}})", "current")]),
        panel("Checkpoint writes", [
            q(f"sum(kubetrain_checkpoint_write_bytes_per_second{{{J}}})", "write B/s (last save)"),
            q(f"sum(increase(kubetrain_checkpoint_failures_total{{{J}}}[$__range]))", "failed saves"),
        ]),
        row("GPUs (dcgm-exporter)"),
        panel("GPU utilisation", [q(f"avg by (pod) (DCGM_FI_DEV_GPU_UTIL{{{GPU}}})", "{{pod}}")], unit="percent"),
        panel("Tensor core activity", [q(f"avg by (pod) (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{GPU}}})", "{{pod}}")],
              unit="percentunit"),
        panel("GPU memory used", [q(f"sum by (pod) (DCGM_FI_DEV_FB_USED{{{GPU}}})", "{{pod}}")], unit="decmbytes"),
        panel("GPU power", [q(f"sum by (pod) (DCGM_FI_DEV_POWER_USAGE{{{GPU}}})", "{{pod}}")], unit="watt"),
    ],
}

OPERATOR = {
    "uid": "kubetrain-operator",
    "title": "kubetrain / Operator",
    "description": "The kubetrain operator: jobs by phase, reconcile latency, pods, restarts and errors.",
    "variables": [("operator_job", "label_values(kubetrain_operator_jobs, job)")],
    "panels": [
        panel("Jobs by phase", [q('max by (phase) (kubetrain_operator_jobs{job="$operator_job"})', "{{phase}}")],
              description="The leader's count; standby replicas report zeros."),
        panel("Reconcile latency", [
            q(f'histogram_quantile({p}, sum by (le) (rate(kubetrain_operator_reconcile_duration_seconds_bucket'
              f'{{job="$operator_job"}}[$__rate_interval])))', f"p{round(p * 100)}") for p in (0.5, 0.9, 0.99)
        ], unit="s"),
        panel("Reconciles/s", [q('sum(rate(kubetrain_operator_reconcile_duration_seconds_count{job="$operator_job"}'
                                 '[$__rate_interval]))', "reconciles")], unit="ops"),
        panel("Pods created and deleted", [
            q('sum(increase(kubetrain_operator_pods_created_total{job="$operator_job"}[$__rate_interval]))', "created"),
            q('sum(increase(kubetrain_operator_pods_deleted_total{job="$operator_job"}[$__rate_interval]))', "deleted"),
        ]),
        panel("Restarts by reason", [q('sum by (reason) (increase(kubetrain_operator_restarts_total'
                                       '{job="$operator_job"}[$__rate_interval]))', "{{reason}}")]),
        panel("Errors", [q('sum by (kind) (increase(kubetrain_operator_errors_total{job="$operator_job"}'
                           '[$__rate_interval]))', "{{kind}}")],
              description="Failed reconciles, pod creates the API server refused, and progress reads (each is "
                          "retried)."),
        panel("Progress reads", [q('sum by (result) (rate(kubetrain_operator_progress_reads_total'
                                   '{job="$operator_job"}[$__rate_interval]))', "{{result}}")], unit="reqps"),
        panel("Replicas up", [q('sum(up{job="$operator_job"})', "up")], kind="stat",
              description="Operator replicas answering scrapes (one leads, the others stand by)."),
        panel("Leader", [q('max by (pod) (kubetrain_operator_leader{job="$operator_job"})', "{{pod}}")], kind="stat",
              description="1 on the replica holding the Lease."),
    ],
}


def options(kind: str) -> dict[str, Any]:
    if kind == "timeseries":
        return {"legend": {"displayMode": "list", "placement": "bottom"}}
    return {"reduceOptions": {"calcs": ["lastNotNull"]}}


def build(spec: dict[str, Any]) -> dict[str, Any]:
    panels, x, y, height = [], 0, 0, 8
    for i, p in enumerate(spec["panels"], start=1):
        if p["type"] == "row":
            y += height if x else 0
            x = 0
            panels.append({"id": i, "type": "row", "title": p["title"], "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
            continue
        w = p["width"]
        if x + w > 24:
            x, y = 0, y + height
        targets = [{"datasource": DS, "refId": chr(ord("A") + n), "expr": t["expr"], "legendFormat": t["legendFormat"]}
                   for n, t in enumerate(p["targets"])]
        panels.append({"id": i, "type": p["type"], "title": p["title"], "description": p["description"],
                       "datasource": DS, "gridPos": {"h": height, "w": w, "x": x, "y": y},
                       "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
                       "options": options(p["type"]), "targets": targets})
        x += w
    variables: list[dict[str, Any]] = [{"name": "datasource", "label": "Data source", "type": "datasource",
                                        "query": "prometheus", "current": {}, "hide": 0}]
    for name, query in spec["variables"]:
        variables.append({"name": name, "label": name, "type": "query", "datasource": DS,
                          "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
                          "sort": 1, "current": {}, "hide": 0, "includeAll": False, "multi": False})
    return {"uid": spec["uid"], "title": spec["title"], "description": spec["description"], "tags": ["kubetrain"],
            "editable": True, "schemaVersion": 39, "version": 1, "time": {"from": "now-6h", "to": "now"},
            "refresh": "30s", "timezone": "", "graphTooltip": 1, "links": [], "annotations": {"list": []},
            "templating": {"list": variables}, "panels": panels}


def render() -> dict[str, str]:
    return {f"{name}.json": json.dumps(build(spec), indent=2) + "\n"
            for name, spec in (("training-job", TRAINING), ("operator", OPERATOR))}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT.relative_to(OUT.parents[2])}/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
