"""Alerts and dashboards against reality: promtool checks and unit-tests the chart's alerts, and a real
Prometheus (Debian's 2.42, on 127.0.0.1) scrapes a real `kubetrain run` and a real `kubetrain operator
--leader-elect` process (as the chart runs it) against a real Kubernetes API server (tests/cluster; the test
plays the kubelet of the job's pods); then every dashboard panel's query and every metric an alert reads must
return data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from cluster.client import Kube, ns_path
from support import ROOT, free_port, job_manifest, training_spec, wait_until, write_manifest
from support.chart import CHART, rules_file, script, tool
from support.operator import Jobs, PlayedKubelet
from support.prometheus import NOT_HERE, api, dashboard_queries, panels_without_data, running
from support.prometheus import query as query_now
from support.runs import read_events

JOB = "scrape-demo"
OPERATOR_JOB = "kubetrain-metrics"  # the chart's metrics Service: the ServiceMonitor's job label


def training_labels(namespace: str) -> dict[str, str]:
    """What Prometheus' pod discovery would attach to worker 0's metrics."""
    return {"namespace": namespace, "job_name": JOB, "pod": f"{JOB}-worker-0"}


def variables(namespace: str) -> dict[str, str]:
    """Grafana's variables, as a dashboard user would have them for this run."""
    return {"$namespace": namespace, "$job_name": JOB, "$operator_job": OPERATOR_JOB, "$__rate_interval": "10s",
            "$__interval": "1s", "$__range_s": "30", "$__range": "30s"}


# The panels that cannot have data here: support.prometheus.NOT_HERE (the GPU panels).
ALERT_METRICS_NOT_HERE: dict[str, str] = {}




# --- promtool ------------------------------------------------------------------------------------------------


def test_promtool_checks_and_unit_tests_every_alert(tmp_path: Path) -> None:
    rules = rules_file(tmp_path / "rules.yaml")
    check = subprocess.run([tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = tmp_path / "alerts-test.yaml"
    shutil.copy(ROOT / "tests" / "promtool" / "alerts-test.yaml", tests)
    result = subprocess.run([tool("promtool"), "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has a firing case and a quiet one.
    alerts = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    cases = [c for t in yaml.safe_load(tests.read_text())["tests"] for c in t["alert_rule_test"]]
    runbooks = (ROOT / "docs" / "operations.md").read_text()
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert rule["annotations"]["runbook_url"].endswith("operations.md#" + rule["alert"].lower())
            assert f"\n### {rule['alert']}\n" in runbooks, f"{rule['alert']}: no runbook in docs/operations.md"
    for alert in alerts:
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), f"{alert}: no firing case"
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), f"{alert}: no quiet case"


def test_promtool_fails_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same tests against rules with a doubled stall window do not pass."""
    rules_file(tmp_path / "rules.yaml", "--set", "prometheusRule.stalledMinutes=40")
    shutil.copy(ROOT / "tests" / "promtool" / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    result = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "alerts-test.yaml")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "KubetrainTrainingStalled" in result.stdout + result.stderr


# --- dashboards -------------------------------------------------------------------------------------------


def test_dashboards_are_generated_and_well_formed() -> None:
    for name, text in script("dashboards").render().items():
        assert (CHART / "dashboards" / name).read_text() == text, f"{name} drifted: run `make manifests`"
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"].startswith("kubetrain / ")
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        names = {v["name"] for v in board["templating"]["list"]}
        for p in board["panels"]:
            if p["type"] != "row":
                assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
                for t in p["targets"]:
                    used = set(re.findall(r"\$([a-z_]+)", t["expr"])) - {"__rate_interval", "__interval", "__range",
                                                                       "__range_s"}
                    assert used <= names, f"{p['title']}: undefined variables {used - names}"
    titles = {t for (board, t, _), _ in dashboard_queries() if board == "training-job"}
    for wanted in ("Loss", "Learning rate", "Gradient norm", "Tokens/s", "Tokens/s per node", "MFU", "Step time",
                   "Data wait", "Goodput", "Checkpoint time per save", "Last committed step", "Restarts", "Workers",
                   "GPU utilisation"):
        assert wanted in titles, wanted
    assert {k for k in NOT_HERE} <= {k for k, _ in dashboard_queries()}, "NOT_HERE names a panel that is gone"


# --- a real scrape ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def prometheus(tmp_path: Path, targets: dict[str, tuple[int, dict[str, str]]], rules: Path) -> Iterator[str]:
    """Prometheus on 127.0.0.1 scraping each job's target every second; yields its base URL."""
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
              # honor_labels as the chart's ServiceMonitor sets it: the operator's per-job metrics keep their
              # own namespace label instead of exported_namespace.
              "scrape_configs": [{"job_name": job, "honor_labels": True,
                                  "static_configs": [{"targets": [f"127.0.0.1:{p}"], "labels": labels}]}
                                 for job, (p, labels) in targets.items()]}
    with running(tmp_path, config) as base:
        yield base


async def query(base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query, off the event loop (the played kubelet runs in it)."""
    return await asyncio.to_thread(query_now, base, expr)


@contextlib.asynccontextmanager
async def training_run(tmp_path: Path, prepared: Path, port: int) -> AsyncIterator[Path]:
    """`kubetrain run` of a small job that trains until stopped, checkpointing and evaluating often."""
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        "scrape-demo", spec=training_spec(prepared),
        training={"maxSteps": 100000, "evalEvery": 40, "evalBatches": 1, "compile": False},
        checkpoint={"everySteps": 40, "keep": 1}, metrics={"port": port}))
    out = tmp_path / "run"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetrain_cli", "run", str(manifest), "--output", str(out),
        stdout=(tmp_path / "run.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield out
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # checkpoints the current step and exits 143
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def operator_process(tmp_path: Path, kubeconfig: Path, namespace: str,
                           port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`kubetrain operator` with the chart's arguments and environment (POD_NAME, POD_NAMESPACE from the
    downward API), against the API server, with short periods (KUBETRAIN_OPERATOR_* settings)."""
    import os

    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": "kubetrain-operator-0",
           "POD_NAMESPACE": namespace, "KUBETRAIN_OPERATOR_RESYNC_SECONDS": "0.5",
           "KUBETRAIN_OPERATOR_PROGRESS_INTERVAL_SECONDS": "0.2", "KUBETRAIN_OPERATOR_ERROR_BACKOFF_SECONDS": "0.1",
           "KUBETRAIN_OPERATOR_BELOW_MIN_GRACE_SECONDS": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with (tmp_path / "operator.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetrain_cli", "operator", f"--namespace={namespace}",
                                 "--leader-elect", f"--metrics-port={port}", "--liveness-port=0"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            # Off the event loop: the played kubelet in this loop keeps finishing deletions meanwhile.
            loop = asyncio.get_running_loop()
            if proc.poll() is None:
                proc.terminate()
            try:
                await loop.run_in_executor(None, proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await loop.run_in_executor(None, proc.wait)
    assert "Traceback" not in (tmp_path / "operator.log").read_text(), (tmp_path / "operator.log").read_text()[-3000:]


def create_errors(port: int) -> float:
    """The operator's own count of pod creates the API server refused, read off its /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('kubetrain_operator_errors_total{kind="create"}'))


async def operator_scenario(jobs: Jobs, kubelet: PlayedKubelet, trainer_port: int, operator_port: int) -> None:
    """Drives the operator through what its dashboard shows: an error (a ResourceQuota of no pods: the API server
    refuses the pod creations), pod creations, running workers whose worker 0 is the live
    trainer (its /progress is read)."""
    kube, namespace = jobs.kube, jobs.namespace
    quotas = ns_path(namespace, "resourcequotas")
    kube.create(quotas, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
                         "spec": {"hard": {"pods": "0"}}})
    await wait_until(lambda: kube.get(f"{quotas}/no-pods").get("status", {}).get("hard"), what="the quota's status")
    jobs.create(jobs.manifest(JOB, metrics={"port": trainer_port}, runPolicy={"restartBackoffSeconds": 0}))
    await wait_until(lambda: asyncio.to_thread(create_errors, operator_port), timeout=30,
                     what="a pod create refused for the quota")
    kube.delete(f"{quotas}/no-pods")
    await wait_until(lambda: len(kubelet.pods(JOB)) == 2, timeout=30, what="2 worker pods")
    await kubelet.run_all(JOB)  # running, at the trainer's address (worker 0 serves /progress)


@pytest_asyncio.fixture
async def kubelet(played_kubelet: PlayedKubelet) -> AsyncIterator[PlayedKubelet]:
    async with played_kubelet.running():
        yield played_kubelet


@pytest.mark.slow
@pytest.mark.asyncio
async def test_every_panel_and_alert_reads_real_metrics(prepared: Path, tmp_path: Path, control_plane: Any, kube: Kube,
                                                        namespace: str, kubelet: PlayedKubelet) -> None:
    jobs = Jobs(kube, namespace)
    trainer_port, operator_port = free_port(), free_port()
    rules = rules_file(tmp_path / "rules.yaml")
    targets = {"kubetrain-training": (trainer_port, training_labels(namespace)),
               OPERATOR_JOB: (operator_port, {"namespace": "kubetrain", "pod": "kubetrain-operator-0"})}
    with prometheus(tmp_path, targets, rules) as base:
        async with training_run(tmp_path, prepared, trainer_port) as out, \
                operator_process(tmp_path, Path(control_plane.kubeconfig), namespace, operator_port):
            await wait_until(lambda: query(base, "kubetrain_operator_leader == 1"), timeout=60,
                             what="the operator to lead")
            await operator_scenario(jobs, kubelet, trainer_port, operator_port)
            await wait_until(lambda: query(base, 'kubetrain_operator_progress_reads_total{result="ok"}'),
                             timeout=60, what="a /progress read in Prometheus")
            kubelet.exit(f"{JOB}-worker-1", 137)  # a restart, counted by reason
            # Enough for rates and checkpoint/eval events: two checkpoints after the first one.
            await wait_until(lambda: sum(1 for _ in read_events(out, "checkpoint")) >= 2, timeout=120,
                             what="two checkpoints of the training run")
            await wait_until(lambda: query(base, "kubetrain_operator_restarts_total"), timeout=30,
                             what="the restart in Prometheus")
            await wait_until(lambda: query(base, "kubetrain_operator_errors_total"), timeout=30,
                             what="the failed reconcile in Prometheus")
            await check_queries(base, rules, tmp_path / "queries.json", variables(namespace))


async def check_queries(base: str, rules: Path, report: Path, variables: dict[str, str]) -> None:
    # Rates need a few scrapes of the latest checkpoint and eval: wait (a while at most) for every panel.
    async def complete() -> bool:
        return not await asyncio.to_thread(panels_without_data, base, variables)

    with contextlib.suppress(AssertionError):
        await wait_until(complete, timeout=20, what="every panel to have data")
    empty = await asyncio.to_thread(panels_without_data, base, variables, report)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            for metric in set(re.findall(r"\b(kubetrain_[a-z_]+|up)\b", rule["expr"])) - set(ALERT_METRICS_NOT_HERE):
                if not await query(base, f'count({{__name__="{metric}"}})'):
                    empty.append(f"{rule['alert']}: {metric}")
    assert not empty, "alerts read metrics that do not exist:\n" + "\n".join(empty)

    # Prometheus itself loaded the chart's rules and evaluates every one without error.
    groups = (await asyncio.to_thread(api, base, "rules"))["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
    assert len(health) == 6 and all(h == "ok" for h, _ in health.values()), health
