"""The Helm chart (charts/kubetrain) and the plain manifests generated from it, checked with the real tools:
helm lint and template (Helm 4, and Helm 3 rendering the same), Kubernetes' own schemas (kubernetes-validate)
for 1.28 and 1.35, yamllint, the values schema, the objects each switch adds, and manifests/ drift. Its RBAC
against the operator's code: test_chart_rbac.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support import ROOT
from support.chart import ALL_ON, CHART, NAMESPACE, RELEASE, helm, one, script, template, template_text, tool

KUBERNETES_VERSIONS = ["1.28.0", "1.35.0"]  # kubernetes-validate 1.37.0 ships schemas for exactly these
MONITORING = "monitoring.coreos.com/v1"
VARIANTS = {
    "defaults": [],
    "all-on": ALL_ON,
    "restricted": [*ALL_ON, "--set", "watchNamespaces={ml,research}", "--set", "replicas=3",
                   "--set", "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/x",
                   "--set", "grafanaDashboards.folder=kubetrain"],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, template_text(*VARIANTS[request.param])


def test_helm_lint_strict() -> None:
    for args in VARIANTS.values():
        result = helm("lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_fit_kubernetes_schemas(rendered: tuple[str, str], version: str) -> None:
    name, text = rendered
    objs = [d for d in yaml.safe_load_all(text) if d]
    builtin = [o for o in objs if o["apiVersion"] != MONITORING]
    for obj in builtin:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown or wrong field
    crd = yaml.safe_load((CHART / "crds" / "llmtrainingjobs.yaml").read_text())
    kubernetes_validate.validate(crd, version, strict=True)
    if name != "defaults":  # the Prometheus operator's kinds have no schema here: check their shape below
        assert {o["kind"] for o in objs if o["apiVersion"] == MONITORING} == {"ServiceMonitor", "PodMonitor",
                                                                             "PrometheusRule"}


def test_a_wrong_field_fails_validation() -> None:
    """The schema check can fail: a Deployment with a misspelt field is refused in strict mode."""
    deploy = one(template(), "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, KUBERNETES_VERSIONS[0], strict=True)


def test_yamllint_values_and_rendered(rendered: tuple[str, str], tmp_path: Path) -> None:
    _, text = rendered
    out = tmp_path / "rendered.yaml"
    out.write_text(text)
    # helm's output: `---` separators and `# Source:` comments; long lines come from embedded dashboards.
    config = ("{extends: default, rules: {line-length: {max: 160}, document-start: disable, "
              "comments: {min-spaces-from-content: 1}, comments-indentation: disable}}")
    for path in (CHART / "values.yaml", CHART / "Chart.yaml", out):
        lines = [line for line in path.read_text().splitlines() if len(line) > 160]
        target = path
        if path == out and lines:  # dashboards' JSON lines are data, not YAML layout
            target = tmp_path / "rendered-no-json.yaml"
            target.write_text("\n".join(line for line in text.splitlines() if len(line) <= 160) + "\n")
        result = subprocess.run([sys.executable, "-m", "yamllint", "-s", "-d", config, str(target)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "replicas=0"], "/replicas"),
    (["--set", "serviceMonitr.enabled=true"], "serviceMonitr"),
    (["--set", "serviceMonitor.enabled=yes please"], "/serviceMonitor/enabled"),
    (["--set", "watchNamespaces={Bad_Namespace}"], "/watchNamespaces/0"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "podMonitor.interval=15 seconds"], "/podMonitor/interval"),
    (["--set", "prometheusRule.throughputDropPercent=150"], "/prometheusRule/throughputDropPercent"),
    (["--set", "ports.metrics=70000"], "/ports/metrics"),
])
def test_bad_values_fail_at_install(args: list[str], message: str) -> None:
    result = helm("template", "x", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_helm3_lints_and_renders_exactly_what_helm4_renders() -> None:
    """The chart supports Helm 3 and 4: Helm 3.17 lints it strictly, renders every variant byte for byte as
    Helm 4 does, and its schema check refuses bad values too."""
    def helm3(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("helm3"), *args], capture_output=True, text=True, timeout=120)

    assert helm3("version", "--short").stdout.startswith("v3.")
    for name, args in VARIANTS.items():
        lint = helm3("lint", "--strict", str(CHART), *args)
        assert lint.returncode == 0 and "0 chart(s) failed" in lint.stdout, (name, lint.stdout, lint.stderr)
        rendered = helm3("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
        assert rendered.returncode == 0, rendered.stderr
        assert rendered.stdout == template_text(*args), f"helm 3 renders {name} differently"
    bad = helm3("template", "x", str(CHART), "--set", "replicas=0")
    assert bad.returncode != 0 and "replicas: Must be greater than or equal to 1" in bad.stderr, bad.stderr


def test_defaults_need_no_prometheus_operator_and_switches_add_each_object() -> None:
    kinds = {o["kind"] for o in template()}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service",
                     "Deployment", "Job"}  # the Job: the uninstall hook
    for switch, kind in [("serviceMonitor", "ServiceMonitor"), ("podMonitor", "PodMonitor"),
                         ("prometheusRule", "PrometheusRule"), ("grafanaDashboards", "ConfigMap")]:
        objs = template("--set", f"{switch}.enabled=true")
        assert {o["kind"] for o in objs} - kinds == {kind}, switch


@pytest.mark.parametrize("watch", [[], ["ml", "research"]], ids=["all-namespaces", "watch-namespaces"])
def test_the_uninstall_hook_stops_the_operator_before_helm_deletes_its_rbac(watch: list[str]) -> None:
    """A pre-delete hook (Helm runs it before deleting anything) as the operator's ServiceAccount, for the
    namespaces the operator serves; its pod is not selected by the operator's Deployment; never in manifests/
    (kubectl apply would run it at once)."""
    objs = template(*(["--set", "watchNamespaces={" + ",".join(watch) + "}"] if watch else []))
    hook, deploy = one(objs, "Job", "kubetrain-uninstall"), one(objs, "Deployment", "kubetrain-operator")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    pod = hook["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == deploy["spec"]["template"]["spec"]["serviceAccountName"]
    assert not deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    args = pod["spec"]["containers"][0]["args"]
    served = [f"--namespace={ns}" for ns in watch] or ["--all-namespaces"]
    assert args == ["operator-uninstall", *served, "--deployment=kubetrain-operator",
                    "--lease-name=kubetrain-operator"]
    assert "kind: Job" not in (ROOT / "manifests" / "kubetrain.yaml").read_text()


def test_pod_security_values_reach_the_operator_and_bad_ones_are_refused() -> None:
    """podSecurity (docs/operations.md, Security) becomes the operator's KUBETRAIN_OPERATOR_* variables, which
    kubetrain_operator.pod_template.PodSecurity.from_env reads."""
    relaxed = template("--set", "podSecurity.level=privileged", "--set", "podSecurity.allowedHostPaths={/data,/x}",
                       "--set", "podSecurity.allowedServiceAccounts={s3-reader}")
    deploy = one(relaxed, "Deployment", "kubetrain-operator")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETRAIN_OPERATOR_POD_SECURITY"] == "privileged"
    assert (env["KUBETRAIN_OPERATOR_ALLOWED_HOST_PATHS"], env["KUBETRAIN_OPERATOR_ALLOWED_SERVICE_ACCOUNTS"]) == (
        "/data,/x", "s3-reader")
    for bad in ("podSecurity.level=open", "podSecurity.allowedHostPaths={data}"):
        result = helm("template", RELEASE, str(CHART), "--set", bad, check=False)
        assert result.returncode != 0 and "podSecurity" in result.stderr, result.stderr


def test_operator_deployment() -> None:
    objs = template()
    deploy = one(objs, "Deployment", "kubetrain-operator")
    spec = deploy["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert deploy["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/kubetrain/operator:0.1.0"
    assert container["args"] == ["operator", "--all-namespaces", "--leader-elect", "--lease-name=kubetrain-operator",
                                 "--metrics-port=8080", "--liveness-port=8081"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] if "valueFrom" in e else e["value"]
           for e in container["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name",
                   "KUBETRAIN_OPERATOR_POD_SECURITY": "baseline", "KUBETRAIN_OPERATOR_ALLOWED_HOST_PATHS": "",
                   "KUBETRAIN_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": "", "KUBETRAIN_OPERATOR_ALLOWED_CAPABILITIES": ""}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert spec["serviceAccountName"] == "kubetrain"
    service = one(objs, "Service", "kubetrain-metrics")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"

    restricted = one(template("--set", "watchNamespaces={ml,research}"), "Deployment")
    args = restricted["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml" in args and "--namespace=research" in args and "--all-namespaces" not in args


def test_monitoring_objects_select_the_right_targets() -> None:
    objs = template(*ALL_ON)
    service = one(objs, "Service")
    sm = one(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    pm = one(objs, "PodMonitor")
    assert pm["spec"]["selector"] == {"matchExpressions": [{"key": "kubetrain.io/job-name", "operator": "Exists"}]}
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"  # the trainer container's port name (render.py)
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_kubetrain_io_job_name"], "targetLabel": "job_name"} \
        in endpoint["relabelings"]
    dashboards = [o for o in objs if o["kind"] == "ConfigMap"]
    assert sorted(o["metadata"]["name"] for o in dashboards) == [
        "kubetrain-dashboard-operator", "kubetrain-dashboard-training-job"]
    for cm in dashboards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (text,) = cm["data"].values()
        assert text == (CHART / "dashboards" / next(iter(cm["data"]))).read_text().rstrip("\n")
    relabelled = template("--set", "grafanaDashboards.enabled=true", "--set", "grafanaDashboards.label=my_dash",
                          "--set", "grafanaDashboards.labelValue=yes")
    assert all(o["metadata"]["labels"]["my_dash"] == "yes" for o in relabelled if o["kind"] == "ConfigMap")


def test_notes_say_what_to_do_next() -> None:
    notes = helm("install", "kubetrain", str(CHART), "--dry-run=client", "--namespace", NAMESPACE).stdout
    assert "kubectl get ltj -w" in notes and "manifests/examples/tiny-cpu.yaml" in notes
    assert "serviceMonitor.enabled=true" in notes and "docs/operations.md" in notes


# --- manifests/ ---------------------------------------------------------------------------------------------


def test_manifests_are_generated_from_the_chart() -> None:
    for name, text in script("render_manifests").render().items():
        assert (ROOT / "manifests" / name).read_text() == text, f"manifests/{name} drifted: run `make manifests`"


def test_kustomization_builds_the_install() -> None:
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "manifests")], capture_output=True, text=True,
                         check=True).stdout
    objs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Namespace",
                     "Role", "RoleBinding", "Service", "ServiceAccount"]
    assert all(o["metadata"].get("namespace") in (None, NAMESPACE) for o in objs)
    assert not any(o["kind"] == "LLMTrainingJob" for o in objs), "examples are not part of the install"


@pytest.mark.parametrize("example", sorted((ROOT / "manifests" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_render(example: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kubetrain_cli", "render", str(example), "--namespace", "ml"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert any(o["kind"] == "Pod" for o in objs)
    for obj in objs:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_operators_default_ports_are_the_charts_and_not_prometheus() -> None:
    """`kubetrain operator` run by hand serves where the chart's Service and probes look, and never on 9090
    (Prometheus' default: an operator beside a Prometheus could not bind it)."""
    from kubetrain_cli.main import build_parser

    args = build_parser().parse_args(["operator", "-A"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (args.metrics_port, args.liveness_port) == (values["ports"]["metrics"], values["ports"]["liveness"])
    assert 9090 not in (args.metrics_port, args.liveness_port, values["service"]["port"])
    service = one(template(), "Service", "kubetrain-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"  # the container port named from ports.metrics
