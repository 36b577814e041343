"""The real Prometheus for the monitoring tests (Debian's 2.42 from .tools/bin, `make tools`): starting it on a
config, querying it, the chart's dashboard queries with Grafana's variables substituted, and the chart's
PodMonitor translated into the scrape config the Prometheus operator would generate for it."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from support import free_port, stop_process
from support.chart import CHART, tool

# Queries that cannot return data here, each with its reason. Keep this short: anything else must work.
NOT_HERE = {
    # No GPU in CI: dcgm-exporter's metrics exist only on GPU nodes.
    ("training-job", "GPU utilisation", "A"): "DCGM_FI_DEV_GPU_UTIL (dcgm-exporter)",
    ("training-job", "Tensor core activity", "A"): "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE (dcgm-exporter)",
    ("training-job", "GPU memory used", "A"): "DCGM_FI_DEV_FB_USED (dcgm-exporter)",
    ("training-job", "GPU power", "A"): "DCGM_FI_DEV_POWER_USAGE (dcgm-exporter)",
}

METRIC = re.compile(r"\b(kubetrain_[a-z_]+|up)\b(?=\{|\[| \)|\))")


@contextlib.contextmanager
def running(tmp_path: Path, config: dict[str, Any], host: str = "127.0.0.1") -> Iterator[str]:
    """Prometheus on `host` with `config` (prometheus.yml as a dict), ready; yields its base URL."""
    port = free_port(host)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp_path / "prometheus.log"
    log = log_path.open("w")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={host}:{port}",
                             "--storage.tsdb.retention.time=1h"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield base
    finally:
        stop_process(proc, timeout=20)
        log.close()


def api(base: str, path: str, **params: str) -> Any:
    """GET /api/v1/PATH; the `data` of a successful answer."""
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result (its series)."""
    return list(api(base, "query", query=expr)["result"])


# --- the dashboards -----------------------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[tuple[str, str, str], str]]:
    """((dashboard, panel title, refId), expr) of every panel target of the chart's dashboards."""
    out = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for p in board["panels"]:
            for t in p.get("targets", []):
                out.append(((path.stem, p["title"], t["refId"]), t["expr"]))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables ($namespace, $__range, ...) replaced, the longest names first ($__range_s before
    $__range)."""
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def metrics_of(expr: str) -> set[str]:
    """The kubetrain metrics (and `up`) a query reads."""
    return set(METRIC.findall(expr))


def panels_without_data(base: str, variables: dict[str, str], report: Path | None = None,
                        dashboard: str | None = None) -> list[str]:
    """Each panel query (of `dashboard`, or all) that returns nothing, or only NaN (0/0), or reads a metric
    Prometheus does not have, except NOT_HERE; with `report`, what every query returned is written there."""
    empty, answers = [], {}
    for key, expr in dashboard_queries():
        if dashboard is not None and key[0] != dashboard:
            continue
        expr = substitute(expr, variables)
        result = query(base, expr)
        answers[" / ".join(key)] = {"expr": expr, "result": result}
        if key in NOT_HERE:
            continue
        if not any(r["value"][1] != "NaN" for r in result):  # nothing, or only 0/0
            empty.append(f"{key}: {expr} -> {result}")
        for metric in metrics_of(expr):
            if not query(base, f'count({{__name__="{metric}"}})'):
                empty.append(f"{key}: metric {metric} does not exist")
    if report is not None:
        report.write_text(json.dumps(answers, indent=1))  # what each panel showed, for a look after a failure
    return empty


# --- PodMonitor -> scrape config, as the Prometheus operator generates it -----------------------------------


def label_name(name: str) -> str:
    """A Kubernetes label key as the suffix of Prometheus' `__meta_kubernetes_pod_label_*` names."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def relabel(rule: dict[str, Any]) -> dict[str, Any]:
    """A PodMonitor relabeling (camelCase, monitoring.coreos.com/v1 RelabelConfig) as Prometheus' own."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label", "separator": "separator",
            "regex": "regex", "replacement": "replacement", "action": "action", "modulus": "modulus"}
    unknown = set(rule) - set(keys)
    assert not unknown, f"relabeling fields this translation does not know: {unknown}"
    out = {keys[k]: v for k, v in rule.items()}
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def selector_rules(selector: dict[str, Any]) -> list[dict[str, Any]]:
    """A label selector as keep/drop rules over the pod's `__meta_kubernetes_pod_label(present)_*` labels."""
    rules: list[dict[str, Any]] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        rules.append({"action": "keep", "source_labels": [f"__meta_kubernetes_pod_label_{label_name(key)}",
                                                          f"__meta_kubernetes_pod_labelpresent_{label_name(key)}"],
                      "regex": f"({value});true"})
    for exp in selector.get("matchExpressions") or []:
        name, op, values = label_name(exp["key"]), exp["operator"], "|".join(exp.get("values") or [])
        with_value = [f"__meta_kubernetes_pod_label_{name}", f"__meta_kubernetes_pod_labelpresent_{name}"]
        present = [f"__meta_kubernetes_pod_labelpresent_{name}"]
        rules.append({"In": {"action": "keep", "source_labels": with_value, "regex": f"({values});true"},
                      "NotIn": {"action": "drop", "source_labels": with_value, "regex": f"({values});true"},
                      "Exists": {"action": "keep", "source_labels": present, "regex": "true"},
                      "DoesNotExist": {"action": "drop", "source_labels": present, "regex": "true"}}[op])
    return rules


def podmonitor_namespaces(monitor: dict[str, Any]) -> list[str] | None:
    """The namespaces a PodMonitor's pods are discovered in (None: all)."""
    selector = monitor["spec"].get("namespaceSelector") or {}
    if selector.get("any"):
        return None
    return list(selector.get("matchNames") or [monitor["metadata"]["namespace"]])


def podmonitor_scrape_configs(monitor: dict[str, Any], discovery: dict[str, Any]) -> list[dict[str, Any]]:
    """One scrape config per podMetricsEndpoint, as the Prometheus operator's generatePodMonitorConfig
    writes it, over `discovery` (the service discovery block: `kubernetes_sd_configs` with role pod and the
    namespaces of podmonitor_namespaces, or here `http_sd_configs` pointing at PodDiscovery): no finished pods,
    the pods the selector matches, the container port named as the endpoint's `port`, then `namespace`,
    `container`, `pod`, `job` (`<namespace>/<name>` of the PodMonitor) and `endpoint`, then the endpoint's
    own relabelings."""
    meta, spec = monitor["metadata"], monitor["spec"]
    configs = []
    for i, ep in enumerate(spec["podMetricsEndpoints"]):
        assert "port" in ep, "only endpoints naming a port are translated here"
        rules: list[dict[str, Any]] = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            *selector_rules(spec.get("selector") or {}),
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"]},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": ep["port"]},
            *[relabel(r) for r in ep.get("relabelings") or []],
        ]
        config: dict[str, Any] = {"job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{i}",
                                  "honor_labels": bool(ep.get("honorLabels", False)), **discovery,
                                  "metrics_path": ep.get("path", "/metrics"), "relabel_configs": rules}
        if ep.get("interval"):
            config["scrape_interval"] = ep["interval"]
        configs.append(config)
    return configs


# --- pod discovery ------------------------------------------------------------------------------------------


def pod_target_groups(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods as the target groups of Prometheus' Kubernetes discovery, role `pod` (discovery/kubernetes/pod.go
    of 2.42): a pod without an IP has none; each container port (init containers too) is a target
    `podIP:port`, a container without ports one target `podIP`; the pod's and the container's
    `__meta_kubernetes_*` labels, label and annotation names sanitized as Prometheus does."""
    groups: list[dict[str, Any]] = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        labels = {"__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_pod_name": meta["name"],
                  "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_ready": str(any(
                      c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])).lower(),
                  "__meta_kubernetes_pod_phase": status.get("phase", ""),
                  "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
                  "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""), "__meta_kubernetes_pod_uid": meta["uid"]}
        for kind, values in (("label", meta.get("labels") or {}), ("annotation", meta.get("annotations") or {})):
            for key, value in values.items():
                labels[f"__meta_kubernetes_pod_{kind}_{label_name(key)}"] = value
                labels[f"__meta_kubernetes_pod_{kind}present_{label_name(key)}"] = "true"
        for owner in meta.get("ownerReferences") or []:
            if owner.get("controller"):
                labels["__meta_kubernetes_pod_controller_kind"] = owner["kind"]
                labels["__meta_kubernetes_pod_controller_name"] = owner["name"]
        targets = []
        for init, containers in ((False, spec.get("containers") or []), (True, spec.get("initContainers") or [])):
            for c in containers:
                container = {"__meta_kubernetes_pod_container_name": c["name"],
                             "__meta_kubernetes_pod_container_image": c.get("image", ""),
                             "__meta_kubernetes_pod_container_init": str(init).lower()}
                if not c.get("ports"):
                    targets.append({"__address__": ip, **container})
                for port in c.get("ports") or []:
                    targets.append({"__address__": f"{ip}:{port['containerPort']}", **container,
                                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")})
        # HTTP SD takes one label set per group: a group per target, the pod's labels in each.
        groups.extend({"targets": [t.pop("__address__")], "labels": {**labels, **t}} for t in targets)
    return groups


class PodDiscovery:
    """Prometheus' Kubernetes pod discovery for a Prometheus built without it (Debian's 2.42 leaves
    `kubernetes_sd_configs` out): an HTTP SD endpoint on 127.0.0.1 that, on each refresh, lists the pods of
    `namespaces` from the API server with `client` (a ServiceAccount's) and answers pod_target_groups."""

    def __init__(self, client: Any, namespaces: list[str]):
        import http.server
        import threading

        discovery = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    body, code = json.dumps(discovery.groups()).encode(), 200
                except Exception as exc:  # the API server's refusal, for Prometheus' log and the test's
                    discovery.errors.append(repr(exc))
                    body, code = repr(exc).encode(), 500
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.client, self.namespaces, self.errors = client, namespaces, list[str]()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/targets"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="pod-discovery", daemon=True)

    def groups(self) -> list[dict[str, Any]]:
        pods = [p for ns in self.namespaces for p in self.client.list(f"/api/v1/namespaces/{ns}/pods")]
        return pod_target_groups(pods)

    def __enter__(self) -> PodDiscovery:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
