"""The Helm chart (charts/kubetrain) and the plain manifests generated from it, checked with the real tools:
helm lint and template, Kubernetes' own schemas (kubernetes-validate) for 1.28 and 1.35, yamllint, the
values schema, least-privilege RBAC against the operator's code, and manifests/ drift."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

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
                     "Deployment"}
    for switch, kind in [("serviceMonitor", "ServiceMonitor"), ("podMonitor", "PodMonitor"),
                         ("prometheusRule", "PrometheusRule"), ("grafanaDashboards", "ConfigMap")]:
        objs = template("--set", f"{switch}.enabled=true")
        assert {o["kind"] for o in objs} - kinds == {kind}, switch


def test_operator_deployment() -> None:
    objs = template()
    deploy = one(objs, "Deployment", "kubetrain-operator")
    spec = deploy["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert deploy["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/kubetrain/operator:0.1.0"
    assert container["args"] == ["operator", "--all-namespaces", "--leader-elect", "--lease-name=kubetrain-operator",
                                 "--metrics-port=8080", "--liveness-port=8081"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
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


# --- least-privilege RBAC ------------------------------------------------------------------------------------

OPERATOR_SRC = ROOT / "operator" / "kubetrain_operator"
# The API classes the operator's client uses, and the API group each one serves.
API_GROUPS = {"CoreV1Api": "", "CoordinationV1Api": "coordination.k8s.io", "CustomObjectsApi": None}
VERBS = {"create": "create", "delete": "delete", "patch": "patch", "read": "get", "replace": "update",
         "list": "list"}
PLURALS = {"pod": "pods", "service": "services", "config_map": "configmaps", "lease": "leases",
           "event": "events", "secret": "secrets"}

# What Kopf 1.45 itself calls for our handlers (handlers.py) and settings (runner.py: standalone=True, so no
# peering objects; handlers.configure: annotation-based progress and diffbase storage). Namespaced: granted in
# every served namespace. `resource` is the handlers' resource, checked against Kopf's registry below.
KOPF_NAMESPACED = {
    # kopf/_core/reactor/queueing.py watcher → _cogs/clients/watching.py infinite_watch: fetching.fetch_objs
    # (the initial list) and continuous_watch (?watch=true), for every resource with handlers: the jobs
    # (@kopf.on.event, @kopf.daemon) and pods (@kopf.index, @kopf.on.event).
    ("kubetrain.io", "llmtrainingjobs", "list"), ("kubetrain.io", "llmtrainingjobs", "watch"),
    ("", "pods", "list"), ("", "pods", "watch"),
    # _cogs/clients/patching.py patch_obj: the finalizer (daemons need one) and the progress/diffbase
    # annotations, on resources with daemons (the jobs). Status is never part of it with annotation storage.
    ("kubetrain.io", "llmtrainingjobs", "patch"),
    # _cogs/clients/events.py post_event: core/v1 events (references.EVENTS = Selector('v1', 'events')), for
    # Kopf's handler reports and our kopf.event calls.
    ("", "events", "create"),
}
# Cluster-scoped, only while settings.scanning.disabled is False (kopf/_core/reactor/observation.py); the
# operator turns scanning off (handlers.configure), so these apply only if that changes.
KOPF_DISCOVERY = {
    # resource_observer: watches CRDs to rescan the served resources when one changes.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
KOPF_NAMESPACE_DISCOVERY = {
    # namespace_observer: lists and watches Namespaces to match the served patterns (not when clusterwide).
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
}


def _const(name: str) -> str:
    from kubetrain_api import manifest as spec

    return str(getattr(spec, name))


def operator_api_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every Kubernetes API method the operator's own code references:
    `<x>.core.create_namespaced_pod`, `<x>.custom.patch_namespaced_custom_object_status` ... where `<x>.core`
    was assigned a kubernetes_asyncio API class (CoreV1Api, CustomObjectsApi, CoordinationV1Api)."""
    calls: set[tuple[str, str, str]] = set()
    for path in sorted(OPERATOR_SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        apis: dict[str, str] = {}  # attribute name → API class
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                func = node.value.func
                cls = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if cls.endswith("Api") and cls != "ApiClient":
                    assert cls in API_GROUPS, f"{path.name}: {cls}: teach this test which group it serves"
                    for target in node.targets:
                        if isinstance(target, ast.Attribute):
                            apis[target.attr] = cls
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr in apis):
                continue
            cls, method = apis[node.value.attr], node.attr
            verb, _, rest = method.partition("_")
            assert verb in VERBS, f"{path.name}: {method}: unknown verb"
            rest = rest.removeprefix("namespaced_")
            sub = ""
            for suffix in ("_status", "_scale"):
                if rest.endswith(suffix):
                    rest, sub = rest.removesuffix(suffix), "/" + suffix[1:]
            if cls == "CustomObjectsApi":
                assert rest == "custom_object", method
                # Every custom-object call names the group and plural constants (kube.py: GROUP, ..., PLURAL).
                used = _custom_call_args(tree, node)
                assert {"GROUP", "PLURAL"} <= used, f"{path.name}: {method} not called with GROUP and PLURAL"
                calls.add((_const("GROUP"), _const("PLURAL") + sub, VERBS[verb]))
            else:
                assert rest in PLURALS, f"{path.name}: {method}: teach this test the plural of {rest}"
                calls.add((API_GROUPS[cls] or "", PLURALS[rest] + sub, VERBS[verb]))
    return calls


def _custom_call_args(tree: ast.AST, attr: ast.Attribute) -> set[str]:
    """Names passed along with a custom-objects method: `self._call(method, GROUP, VERSION, ns, PLURAL, ...)`
    or `method(GROUP, VERSION, ns, PLURAL, ...)`."""
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and (call.func is attr or attr in call.args):
            return {a.id for a in call.args if isinstance(a, ast.Name)}
    return set()


def kopf_needs(clusterwide: bool) -> tuple[set[tuple[str, str, str]], set[tuple[str, str, str]]]:
    """(namespaced, cluster-scoped) rules Kopf's own calls need with the operator's handlers and settings."""
    import kopf
    from kubetrain_operator import handlers

    registry = kopf.get_default_registry() if hasattr(kopf, "get_default_registry") else None
    if registry is None:
        from kopf._core.intents import registries

        registry = registries.default_registry()
    watched = {s.plural or s.any_name for r in (registry._indexing, registry._watching, registry._spawning,
                                                  registry._changing) for s in r.get_all_selectors()}
    patched = {s.plural or s.any_name for r in (registry._spawning, registry._changing) for s in r.get_all_selectors()}
    assert watched == {"pods", "llmtrainingjobs"} and patched == {"llmtrainingjobs"}, (
        f"handlers changed (watched {watched}, patched {patched}): update KOPF_NAMESPACED")
    assert not registry._webhooks.get_all_handlers(), "admission webhooks need more RBAC: update this test"
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    cluster: set[tuple[str, str, str]] = set()
    if not settings.scanning.disabled:
        cluster |= KOPF_DISCOVERY
        if not clusterwide:
            cluster |= KOPF_NAMESPACE_DISCOVERY
    return set(KOPF_NAMESPACED), cluster


def granted(objs: list[dict[str, Any]], sa: str = "kubetrain") -> tuple[set[Any], dict[str, set[Any]]]:
    """(cluster-wide grants, {namespace: grants}) of the operator's ServiceAccount, as (group, resource, verb)."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    cluster: set[Any] = set()
    per_ns: dict[str, set[Any]] = {}
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
                   for s in b["subjects"]):
            continue
        ns = b["metadata"].get("namespace")
        role = roles[(b["roleRef"]["kind"], ns if b["roleRef"]["kind"] == "Role" else None, b["roleRef"]["name"])]
        rules = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                 for v in rule["verbs"]}
        assert not any("*" in t for t in rules), "no wildcards"
        (cluster if b["kind"] == "ClusterRoleBinding" else per_ns.setdefault(ns, set())).update(rules)
    return cluster, per_ns


def test_operator_api_calls_are_found() -> None:
    calls = operator_api_calls()
    # What kube.py does today (a sanity check of the parser, not the comparison itself).
    assert {("", "pods", "create"), ("", "pods", "delete"), ("", "services", "create"),
            ("", "configmaps", "create"), ("", "configmaps", "patch"),
            ("kubetrain.io", "llmtrainingjobs", "delete"), ("kubetrain.io", "llmtrainingjobs/status", "patch")} <= calls


@pytest.mark.parametrize("watch", [[], ["ml", "research"]], ids=["all-namespaces", "watch-namespaces"])
def test_rbac_is_exactly_what_the_operator_calls(watch: list[str]) -> None:
    args = ["--set", "watchNamespaces={" + ",".join(watch) + "}"] if watch else []
    cluster, per_ns = granted(template(*args))
    calls = operator_api_calls()
    leases = {c for c in calls if c[1] == "leases"}  # leader election: the operator's own namespace only
    namespaced, discovery = kopf_needs(clusterwide=not watch)
    jobs = (calls - leases) | namespaced
    assert per_ns.pop(NAMESPACE, set()) == leases, "the leader-election Role in the release namespace"
    if watch:
        assert cluster == discovery
        assert per_ns == {ns: jobs for ns in watch}
    else:
        assert cluster == jobs | discovery, (f"missing: {sorted(jobs | discovery - cluster)}; "
                                             f"unused: {sorted(cluster - jobs - discovery)}")
        assert per_ns == {}


def test_user_roles_aggregate_into_view_and_edit() -> None:
    objs = template()
    view, edit = one(objs, "ClusterRole", "kubetrain-view"), one(objs, "ClusterRole", "kubetrain-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert not any(b["roleRef"]["name"] in ("kubetrain-view", "kubetrain-edit") for b in objs
                   if b["kind"].endswith("Binding"))
    assert "ClusterRole" not in {o["kind"] for o in template("--set", "rbac.aggregateToUserRoles=false")
                                 if o["metadata"]["name"].endswith(("-view", "-edit"))}


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
