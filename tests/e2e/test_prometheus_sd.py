"""Metrics found by service discovery: Prometheus (Debian's 2.42) on the host discovers a running training job's
worker pods through the test bed's API server (as a ServiceAccount allowed only to get/list/watch pods in the
test's namespace), keeps and relabels them as the chart's PodMonitor says (rendered by the real helm, translated
into relabel rules as the Prometheus operator does: support.prometheus.podmonitor_scrape_configs), and scrapes
them at their pod IPs on the bridge.

Debian builds Prometheus without its Kubernetes discovery (`kubernetes_sd_configs` is an unknown field there:
test_debian_prometheus_has_no_kubernetes_discovery, which fails the day the binary has it, so this test can move
to it). Until then the pods reach Prometheus through its HTTP discovery from support.prometheus.PodDiscovery,
which lists them from the API server on every refresh (1 s) and labels them as the Kubernetes discovery's pod
role does; Prometheus' relabelling, scraping and queries are its own. Then every
training-dashboard panel query returns data (the GPU panels excepted: support.prometheus.NOT_HERE), every
series of the trainer's metrics comes from those pods with the labels the dashboards group by, and a pod the
PodMonitor does not select (a decoy with a `metrics` port, no job label) is discovered but never scraped.

The operator runs on the host, not in a pod, so its metrics (the Restarts and Workers panels read two) are
scraped at its address as the chart's ServiceMonitor would (`honor_labels`).

Fixtures: tests/e2e/conftest.py; the helpers: tests/support/bed.py and tests/support/prometheus.py."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.client import ApiError, Kube, ns_path
from support import wait_for
from support.bed import apply, diagnose, manifest, secret, wait_or_explain, workers
from support.chart import one, template, tool
from support.prometheus import (
    PodDiscovery,
    api,
    metrics_of,
    panels_without_data,
    podmonitor_namespaces,
    podmonitor_scrape_configs,
    query,
    running,
)
from support.prometheus import dashboard_queries as all_queries
from support.s3 import MotoServer

pytestmark = pytest.mark.slow

JOB = "scraped"
PORT = 9400  # spec.metrics.port: the container port `metrics` of every worker
OPERATOR_JOB = "kubetrain-metrics"  # the chart's ServiceMonitor's job label


def variables(ns: str) -> dict[str, str]:
    """Grafana's variables, as a dashboard user would have them for this job."""
    return {"$namespace": ns, "$job_name": JOB, "$operator_job": OPERATOR_JOB, "$__rate_interval": "10s",
            "$__interval": "1s", "$__range_s": "60", "$__range": "60s"}


def prometheus_token(kube: Kube, ns: str) -> str:
    """A ServiceAccount `prometheus` with a Role to get/list/watch pods in `ns` (what pod discovery there
    needs, nothing more), and a token for it from the TokenRequest API."""
    kube.create(ns_path(ns, "serviceaccounts"), {"apiVersion": "v1", "kind": "ServiceAccount",
                                                 "metadata": {"name": "prometheus"}})
    rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/" + ns
    kube.create(f"{rbac}/roles", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                  "metadata": {"name": "prometheus"},
                                  "rules": [{"apiGroups": [""], "resources": ["pods"],
                                             "verbs": ["get", "list", "watch"]}]})
    kube.create(f"{rbac}/rolebindings", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                         "metadata": {"name": "prometheus"},
                                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                     "name": "prometheus"},
                                         "subjects": [{"kind": "ServiceAccount", "name": "prometheus",
                                                       "namespace": ns}]})
    answer = kube.create(ns_path(ns, "serviceaccounts", "prometheus") + "/token",
                         {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 3600}})
    return str(answer["status"]["token"])


def token_kubeconfig(admin: Path, token: str, path: Path) -> Path:
    """A kubeconfig for the same API server and CA as `admin`'s, authenticating with `token`."""
    config = yaml.safe_load(admin.read_text())
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    base64.b64decode(cluster["certificate-authority-data"], validate=True)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "prometheus",
        "clusters": [{"name": "bed", "cluster": cluster}], "users": [{"name": "prometheus", "user": {"token": token}}],
        "contexts": [{"name": "prometheus", "context": {"cluster": "bed", "user": "prometheus"}}]}))
    return path


def decoy(kube: Kube, ns: str) -> str:
    """A running pod with a container port `metrics` serving HTTP but no kubetrain.io/job-name label."""
    kube.create(ns_path(ns, "pods"), {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "decoy", "labels": {"app": "decoy"}}, "spec": {"containers": [{
            "name": "web", "image": "ghcr.io/kubetrain/trainer:0.1.0",
            "command": ["python", "-m", "http.server", str(PORT)],
            "ports": [{"name": "metrics", "containerPort": PORT, "protocol": "TCP"}]}]}})
    return "decoy"


def operator_port(proc: Any) -> int:
    """The operator fixture's --metrics-port."""
    args = [str(a) for a in proc.args]
    return int(args[args.index("--metrics-port") + 1])


def targets(base: str) -> dict[str, Any]:
    return dict(api(base, "targets", state="any"))


def training_targets(base: str, pool: str) -> list[dict[str, Any]]:
    return [t for t in targets(base)["activeTargets"] if t["scrapePool"] == pool]


def pod_series(base: str, metric: str, ns: str) -> list[dict[str, str]]:
    """The label sets of the target labels of every series of `metric` in `ns`."""
    by = "job, namespace, pod, instance, container, endpoint, job_name, replica_index"
    return [r["metric"] for r in query(base, f'group by ({by}) ({{__name__="{metric}", namespace="{ns}"}})')]


def test_debian_prometheus_has_no_kubernetes_discovery(tmp_path: Path) -> None:
    """Why the test below discovers through HTTP SD: Debian's build does not know `kubernetes_sd_configs`. Fails
    once the installed Prometheus has it (then discover with it, and drop PodDiscovery)."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "pods", "kubernetes_sd_configs": [
        {"role": "pod", "api_server": "https://127.0.0.1:6443"}]}]}))
    result = subprocess.run([tool("promtool"), "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode != 0 and "field kubernetes_sd_configs not found" in result.stdout + result.stderr, \
        result.stdout + result.stderr


def test_prometheus_discovers_the_workers_through_the_api_server_and_every_panel_has_their_data(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    ns = namespace
    monitor = one(template("--set", "podMonitor.enabled=true", "--set", "podMonitor.interval=1s",
                           "--set", f"watchNamespaces={{{ns}}}"), "PodMonitor")
    assert podmonitor_namespaces(monitor) == [ns]
    account = Kube(token_kubeconfig(Path(control_plane.kubeconfig), prometheus_token(kube, ns),
                                    tmp_path / "prometheus.kubeconfig"))
    # The ServiceAccount sees this namespace's pods and no others (the RBAC a namespaced Prometheus needs).
    account.list(ns_path(ns, "pods"))
    with pytest.raises(ApiError) as refused:
        account.list("/api/v1/pods")
    assert refused.value.status == 403

    decoy_pod = decoy(kube, ns)
    body = manifest(ns, JOB, bed_s3, secret(kube, ns), metrics={"port": PORT},
                    training={"maxSteps": 2000, "evalEvery": 4, "evalBatches": 1, "compile": False},
                    checkpoint={"everySteps": 4, "keep": 1, "exportHF": False})
    with PodDiscovery(account, podmonitor_namespaces(monitor) or []) as discovery:
        pod_monitor = podmonitor_scrape_configs(
            monitor, {"http_sd_configs": [{"url": discovery.url, "refresh_interval": "1s"}]})
        assert len(pod_monitor) == 1
        pool = pod_monitor[0]["job_name"]
        job_label = f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [*pod_monitor, {
                      "job_name": OPERATOR_JOB, "honor_labels": True,
                      "static_configs": [{"targets": [f"127.0.0.1:{operator_port(operator)}"],
                                          "labels": {"namespace": "kubetrain", "pod": "kubetrain-operator-0"}}]}]}
        with running(tmp_path, config) as base:
            apply(control_plane, body, tmp_path)
            check_scrape(local_cluster, kube, ns, tmp_path, base, pool, job_label, decoy_pod, discovery)
    account.close()


def check_scrape(local_cluster: Any, kube: Kube, ns: str, tmp_path: Path, base: str, pool: str, job_label: str,
                 decoy_pod: str, discovery: PodDiscovery) -> None:
    def why() -> str:
        return (diagnose(local_cluster, kube, ns, JOB, tmp_path / "operator.log")
                + "\n--- prometheus targets\n" + json.dumps(targets(base), indent=1)[-6000:]
                + "\n--- prometheus log\n" + (tmp_path / "prometheus.log").read_text()[-3000:]
                + "\n--- discovery errors\n" + "\n".join(discovery.errors[-5:]))

    def pods() -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p for p in workers(kube, ns, JOB)}

    def scraped() -> bool:
        """Both workers are targets, up, at their pod IPs (each a fresh look: a pod may be replaced)."""
        found = {t["labels"]["pod"]: t for t in training_targets(base, pool)}
        now = pods()
        return (len(now) == 2 and set(found) == set(now)
                and all(found[n]["scrapeUrl"] == f"http://{p['status'].get('podIP')}:{PORT}/metrics"
                        and found[n]["health"] == "up" for n, p in now.items()))

    wait_or_explain(scraped, why, 300, "Prometheus to discover and scrape both worker pods at their pod IPs")
    now = pods()
    for t in training_targets(base, pool):
        p = now[t["labels"]["pod"]]
        labels = {k: v for k, v in t["labels"].items() if k != "instance"}
        assert labels == {"job": job_label, "namespace": ns, "pod": p["metadata"]["name"], "container": "trainer",
                          "endpoint": "metrics", "job_name": JOB,
                          "replica_index": p["metadata"]["labels"]["kubetrain.io/replica-index"]}, t
        assert t["labels"]["instance"] == f"{p['status']['podIP']}:{PORT}", t

    # The decoy is discovered (the API server shows it to the ServiceAccount) but dropped by the selector.
    wait_for(lambda: kube.get(ns_path(ns, "pods", decoy_pod))["status"].get("podIP"), timeout=120,
             what="the decoy pod's IP")
    wait_or_explain(lambda: any(t["discoveredLabels"].get("__meta_kubernetes_pod_name") == decoy_pod
                                for t in targets(base)["droppedTargets"]), why, 30,
                    "Prometheus to discover (and drop) the decoy pod")
    assert all(t["labels"].get("pod") != decoy_pod for t in targets(base)["activeTargets"]), why()

    # Every panel: rates need a few scrapes around a checkpoint and an evaluation.
    wanted = variables(ns)
    wait_or_explain(lambda: not panels_without_data(base, wanted, dashboard="training-job"), why, 240,
                    "every training-dashboard panel to have data")
    empty = panels_without_data(base, wanted, tmp_path / "queries.json", dashboard="training-job")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty) + why()

    # ... and what the panels read of the trainer comes from the discovered pods, labelled as they group by.
    now = pods()
    ips = {n: f"{p['status']['podIP']}:{PORT}" for n, p in now.items()}
    trainer_metrics = {m for key, expr in all_queries() if key[0] == "training-job" for m in metrics_of(expr)
                       if not m.startswith("kubetrain_operator_")}
    assert {"kubetrain_loss", "kubetrain_tokens_total", "kubetrain_checkpoint_save_seconds_count"} \
        <= trainer_metrics
    for metric in sorted(trainer_metrics):
        series = pod_series(base, metric, ns)
        assert series, f"{metric}: no series"
        for s in series:
            assert s.get("job") == job_label and s.get("pod") in ips and s.get("instance") == ips[s["pod"]] \
                and s.get("job_name") == JOB and s.get("endpoint") == "metrics", f"{metric}: {s}"
    assert {s["pod"] for s in pod_series(base, "kubetrain_tokens_total", ns)} == set(now), \
        "Tokens/s per node: not every worker's series"
