"""The chart's least-privilege RBAC: exactly what the operator's code calls (its kube.py client calls parsed
with ast) plus what Kopf itself calls for its handlers and settings (checked against Kopf's registry), in
both scopes (all namespaces, watchNamespaces); and the user roles aggregated into view and edit."""

from __future__ import annotations

import ast
from typing import Any

import pytest
from support import ROOT
from support.chart import NAMESPACE, one, template

OPERATOR_SRC = ROOT / "operator" / "kubetrain_operator"
# The API classes the operator's client uses, and the API group each one serves.
API_GROUPS = {"CoreV1Api": "", "CoordinationV1Api": "coordination.k8s.io", "BatchV1Api": "batch",
              "AppsV1Api": "apps", "CustomObjectsApi": None}
VERBS = {"create": "create", "delete": "delete", "patch": "patch", "read": "get", "replace": "update",
         "list": "list"}
PLURALS = {"pod": "pods", "service": "services", "config_map": "configmaps", "lease": "leases",
           "event": "events", "secret": "secrets", "job": "jobs", "deployment": "deployments"}

# What Kopf 1.45 itself calls for our handlers (handlers.py) and settings (runner.py: standalone=True, so no
# peering objects; handlers.configure: annotation-based progress and diffbase storage). Namespaced: granted in
# every served namespace. `resource` is the handlers' resource, checked against Kopf's registry below.
KOPF_NAMESPACED = {
    # kopf/_core/reactor/queueing.py watcher → _cogs/clients/watching.py infinite_watch: fetching.fetch_objs
    # (the initial list) and continuous_watch (?watch=true), for every resource with handlers: the jobs
    # (@kopf.on.event, @kopf.daemon), pods (@kopf.index, @kopf.on.event) and the data preparation's batch Jobs
    # (@kopf.index, @kopf.on.event).
    ("kubetrain.io", "llmtrainingjobs", "list"), ("kubetrain.io", "llmtrainingjobs", "watch"),
    ("", "pods", "list"), ("", "pods", "watch"), ("batch", "jobs", "list"), ("batch", "jobs", "watch"),
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
            rest = rest.removeprefix("namespaced_").removeprefix("cluster_")  # all namespaces: same rule
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
    assert watched == {"pods", "llmtrainingjobs", "jobs"} and patched == {"llmtrainingjobs"}, (
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
    # The operator's own namespace only: leader election, and the uninstall hook scaling the Deployment to 0.
    own = {c for c in calls if c[1] in ("leases", "deployments", "deployments/scale")}
    namespaced, discovery = kopf_needs(clusterwide=not watch)
    jobs = (calls - own) | namespaced
    assert per_ns.pop(NAMESPACE, set()) == own, "the leader-election Role in the release namespace"
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
