"""`helm install` of charts/kubetrain on a real control plane (tests/cluster), with the operator's pods really
running on the local nodes: the chart's probes, securityContext, ServiceAccount and RBAC, leader election
between its two replicas, an LLMTrainingJob reconciled by the installed operator (the trainer's exit reaching
it through the pod's termination message), the hand-over when the leader is killed, and `helm uninstall`.

The release serves one namespace of its own (`watchNamespaces`): a cluster-wide operator would also take up
the jobs that other tests' in-process operators handle in their namespaces on the same control plane, and the
per-namespace Role is the scope that can be checked to be both enough and no more. The tests run in order on
one release (module fixture); the last one uninstalls it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cluster.client import Kube, kubectl, ns_path
from support import ROOT, spec_dict, wait_for
from support.chart import CHART, tool

LEASE = "kubetrain-operator"  # the chart's leaderElection.leaseName
LEASE_SECONDS = 15  # `kubetrain operator --lease-duration`'s default (the chart does not set it)
METRICS_PORT = 8080  # the chart's ports.metrics
LOCAL_NODES = ("node-a", "node-b")


@dataclass
class Release:
    name: str
    namespace: str  # the release's (the operator's pods, the Lease)
    jobs: str  # the namespace it serves
    kubeconfig: Path
    env: dict[str, str]

    @property
    def fullname(self) -> str:
        return f"{self.name}-kubetrain"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component=operator"

    def helm(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("helm"), *args, "--kubeconfig", str(self.kubeconfig), "--namespace",
                               self.namespace], capture_output=True, text=True, timeout=timeout, env=self.env)


def operator_pods(kube: Kube, release: Release) -> list[dict[str, Any]]:
    return sorted(kube.list(ns_path(release.namespace, "pods"), labelSelector=release.selector),
                  key=lambda p: p["metadata"]["name"])


def ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def holder(kube: Kube, release: Release) -> str:
    """The pod named by the Lease's holderIdentity (`<pod>_<random>`), or ''."""
    lease = kube.find(ns_path(release.namespace, "leases", LEASE, group="coordination.k8s.io"))
    identity = str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")
    return identity.rsplit("_", 1)[0]


def leader_gauge(pod: dict[str, Any]) -> float | None:
    """kubetrain_operator_leader from the pod's /metrics, scraped at its pod IP (the host is on the bridge)."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    session = requests.Session()
    session.trust_env = False
    try:
        text = session.get(f"http://{ip}:{METRICS_PORT}/metrics", timeout=2).text
    except requests.RequestException:
        return None
    finally:
        session.close()
    return next((float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("kubetrain_operator_leader ")), None)


def fresh(kube: Kube, release: Release, name: str) -> dict[str, Any]:
    return kube.get(ns_path(release.namespace, "pods", name))  # type: ignore[no-any-return]


def operator_logs(local_cluster: Any, release: Release) -> str:
    return "".join(node.logs(release.namespace, pod) for node in local_cluster.nodes
                   for pod in {d.name.split("_")[1] for d in (node.state / "pods").glob(f"{release.namespace}_*")})


def explained(test: Callable[..., None]) -> Callable[..., None]:
    """A failed assertion comes with the end of the operator pods' output (what `kubectl logs` would show)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            test(*args, **kwargs)
        except AssertionError as exc:
            rel, kube = kwargs["release"], kwargs["kube"]
            logs = operator_logs(kwargs["local_cluster"], rel)
            events = "\n".join(f"{e['involvedObject']['name']}: {e['reason']}: {e['message']}"
                               for ns in (rel.namespace, rel.jobs) for e in kube.list(ns_path(ns, "events"))
                               if e["type"] == "Warning")
            restarts = "\n".join(f"{p['metadata']['name']}: {cs['restartCount']} restarts, last {cs.get('lastState')}"
                                 for p in operator_pods(kube, rel) for cs in p["status"].get("containerStatuses") or [])
            raise AssertionError(f"{exc}\n--- Warning events ---\n{events[-3000:]}\n--- operator pods ---\n{restarts}\n"
                                 f"--- the operator pods' output, last lines ---\n{logs[-5000:]}") from exc

    return run


@pytest.fixture(scope="module")
def release(local_cluster: Any, control_plane: Any, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        Release]:
    """`helm install --create-namespace --wait` of the chart, serving a namespace made for it beforehand."""
    suffix = uuid.uuid4().hex[:5]
    tmp = tmp_path_factory.mktemp("chart-install")
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
           "HELM_DATA_HOME": str(tmp / "data")}
    rel = Release(f"kt-{suffix}", f"kubetrain-system-{suffix}", f"ml-{suffix}", Path(control_plane.kubeconfig), env)
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": rel.jobs}})
    wait_for(lambda: kube.find(ns_path(rel.jobs, "serviceaccounts", "default")), timeout=60,
             what=f"ServiceAccount {rel.jobs}/default")
    values = tmp / "values.yaml"
    # What a user of this cluster would set: the namespace to serve, and the nodes that run containers.
    values.write_text(yaml.safe_dump({"watchNamespaces": [rel.jobs],
                                      "nodeSelector": {"kubetrain.io/local-node": "true"}}))
    try:
        started = time.monotonic()
        result = rel.helm("install", rel.name, str(CHART), "--create-namespace", "--values", str(values),
                          "--wait", "--timeout", "180s")
        assert result.returncode == 0, f"helm install:\n{result.stdout}\n{result.stderr}\n" \
                                       f"{operator_logs(local_cluster, rel)[-4000:]}"
        print(f"helm install --wait: {time.monotonic() - started:.1f}s")
        yield rel
    finally:
        rel.helm("uninstall", rel.name, "--ignore-not-found", "--wait", "--timeout", "60s")
        for job in kube.list(ns_path(rel.jobs, "llmtrainingjobs", group="kubetrain.io", version="v1alpha1")):
            kube.patch(ns_path(rel.jobs, "llmtrainingjobs", job["metadata"]["name"], group="kubetrain.io",
                               version="v1alpha1"), {"metadata": {"finalizers": None}})
        for ns in (rel.jobs, rel.namespace):
            kube.delete(f"/api/v1/namespaces/{ns}")


@explained
def test_the_operator_replicas_run_ready_under_the_charts_service_account_and_rbac(
        release: Release, kube: Kube, local_cluster: Any) -> None:
    """Both replicas of the installed chart, checked in one pass as an operator would look: Ready, who they
    run as, the ServiceAccount their token names, and exactly the RBAC the chart grants."""
    deployment = kube.get(f"/apis/apps/v1/namespaces/{release.namespace}/deployments/{release.fullname}-operator")
    assert (deployment["status"].get("readyReplicas"), deployment["status"].get("availableReplicas")) == (2, 2)
    pods = operator_pods(kube, release)
    assert len(pods) == 2 and all(ready(p) and p["status"]["phase"] == "Running" for p in pods), pods
    # The chart's podAntiAffinity spreads them over the two nodes
    assert sorted(p["spec"]["nodeName"] for p in pods) == list(LOCAL_NODES)
    sa = release.fullname
    for p in pods:
        name = p["metadata"]["name"]
        assert p["spec"]["serviceAccountName"] == sa
        assert p["status"]["containerStatuses"][0]["restartCount"] == 0, p["status"]["containerStatuses"]
        assert p["spec"]["containers"][0]["image"] == "ghcr.io/kubetrain/operator:0.1.0"  # the chart's default
        node = local_cluster.node_of(kube, release.namespace, name)
        running = node.pod(release.namespace, name)
        pid = running["containers"]["operator"]["pid"]
        # The securityContext as the node applied it: user 10001, a read-only root filesystem, /tmp writable
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split()[:2] == ["10001", "10001"] and status["Gid"].split()[0] == "10001"
        mounts = {line.split()[1]: line.split()[3].split(",") for line in Path(f"/proc/{pid}/mounts").read_text()
                  .splitlines()}

        def covering(path: str, mounts: dict[str, list[str]] = mounts) -> str:  # the mount a path is on
            return max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)

        venv = str(ROOT / ".venv")  # the image's venv (this checkout's), wherever the checkout is
        assert all("ro" in mounts[covering(m)] for m in ("/usr", "/etc", venv)) and "rw" in mounts["/tmp"], mounts
        # In-cluster configuration only: the Service variables and the projected token, no kubeconfig (the
        # admin kubeconfig's https://127.0.0.1 is the pod's own loopback in its network namespace anyway).
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode()
                       .split("\0") if "=" in item)
        assert "KUBECONFIG" not in environ and environ["KUBERNETES_SERVICE_HOST"] == "kubernetes.default.svc"
        assert not Path(f"/proc/{pid}/root{release.kubeconfig}").exists()  # the pod's /tmp is its own
        assert (environ["POD_NAME"], environ["POD_NAMESPACE"]) == (name, release.namespace)
        # The mounted token is the chart's ServiceAccount, bound to this pod
        volume = next(v["name"] for v in p["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
        token = (Path(running["dir"]) / "volumes" / volume / "token").read_text()
        review = requests.post(f"{kube.server}/apis/authentication.k8s.io/v1/selfsubjectreviews", verify=kube.verify,
                               headers={"Authorization": f"Bearer {token}"}, timeout=30,
                               json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        user = review.json()["status"]["userInfo"]
        assert user["username"] == f"system:serviceaccount:{release.namespace}:{sa}"
        assert user["extra"]["authentication.kubernetes.io/pod-name"] == [name]
    # What the chart grants that account: enough in the served namespace, nothing elsewhere
    def can(*args: str) -> bool:
        result = kubectl(release.kubeconfig, "auth", "can-i", *args,
                         f"--as=system:serviceaccount:{release.namespace}:{sa}", check=False)
        assert result.stdout.strip() in ("yes", "no"), result.stderr
        return result.stdout.strip() == "yes"

    for verb, resource in (("watch", "llmtrainingjobs.kubetrain.io"), ("patch", "llmtrainingjobs.kubetrain.io/status"),
                           ("create", "pods"), ("delete", "pods"), ("create", "services"), ("patch", "configmaps"),
                           ("create", "events")):
        assert can(verb, resource, "-n", release.jobs), (verb, resource)
    assert can("patch", f"leases.coordination.k8s.io/{LEASE}", "-n", release.namespace)
    assert not can("patch", "leases.coordination.k8s.io/other", "-n", release.namespace)
    for ns in (release.namespace, "default"):
        assert not can("create", "pods", "-n", ns) and not can("list", "llmtrainingjobs.kubetrain.io", "-n", ns)
    assert not can("get", "secrets", "-n", release.jobs) and not can("list", "nodes")


@explained
def test_exactly_one_replica_leads(release: Release, kube: Kube, local_cluster: Any) -> None:
    pods = operator_pods(kube, release)
    names = [p["metadata"]["name"] for p in pods]
    leader = wait_for(lambda: holder(kube, release) in names and holder(kube, release), timeout=60,
                      what="the Lease to name an operator pod")
    wanted = {n: 1.0 if n == leader else 0.0 for n in names}
    wait_for(lambda: {p["metadata"]["name"]: leader_gauge(p) for p in pods} == wanted, timeout=30,
             what=f"kubetrain_operator_leader {wanted}")


@explained
def test_a_job_applied_with_kubectl_is_reconciled_by_the_installed_operator(
        release: Release, kube: Kube, local_cluster: Any, tmp_path: Path) -> None:
    """The worker pod really runs torchrun and the trainer, which rejects its configuration (no tokenizer at that
    path: exit 2, never retried); the operator reads the reason from the pod's termination message and fails
    the job."""
    ns, name = release.jobs, "tiny"
    manifest = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob", "metadata": {"name": name},
                "spec": {"model": {"preset": "tiny"}, "tokenizer": {"path": "/nonexistent/tokenizer"},
                         "data": {"train": "/nonexistent/train", "validation": "/nonexistent/validation",
                                  "seqLength": 64},
                         "training": {"maxSteps": 10, "globalBatchSize": 4, "microBatchSize": 2},
                         "workers": {"nodes": 1, "procPerNode": 1,
                                     "podTemplate": {"nodeSelector": {"kubetrain.io/local-node": "true"},
                                                     "terminationGracePeriodSeconds": 30}},
                         "runPolicy": {"maxRestarts": 0}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    kubectl(release.kubeconfig, "apply", "-n", ns, "-f", str(path))
    job_path = ns_path(ns, "llmtrainingjobs", name, group="kubetrain.io", version="v1alpha1")
    uid = kube.get(job_path)["metadata"]["uid"]

    def owned(obj: dict[str, Any]) -> bool:
        return [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in obj["metadata"].get(
            "ownerReferences") or []] == [("LLMTrainingJob", name, uid, True)]

    service = wait_for(lambda: kube.find(ns_path(ns, "services", name)), timeout=60, what="the job's Service")
    assert owned(service) and service["spec"]["clusterIP"] == "None"
    configmap = wait_for(lambda: kube.find(ns_path(ns, "configmaps", f"{name}-config")), timeout=30,
                         what="the job's ConfigMap")
    assert owned(configmap) and "config.json" in configmap["data"]
    worker = f"{name}-worker-0"
    phases = []

    def failed() -> dict[str, Any] | None:
        job = kube.get(job_path)
        phase = (job.get("status") or {}).get("phase")
        if phase and phase not in phases[-1:]:
            phases.append(phase)
        return job if phase == "Failed" else None

    job = wait_for(failed, timeout=150, what="the job to fail on the trainer's configuration error")
    status = job["status"]
    pod = kube.get(ns_path(ns, "pods", worker))
    logs = local_cluster.node_of(kube, ns, worker).logs(ns, worker)
    print(f"job phases: {phases}, workers: {status['workers']}")
    assert owned(pod) and pod["spec"]["nodeName"] in LOCAL_NODES, pod["metadata"]
    assert pod["spec"]["containers"][0]["image"] == "ghcr.io/kubetrain/trainer:0.1.0"  # the operator's default
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2, (terminated, logs[-3000:])
    assert "tokenizer.path: /nonexistent/tokenizer does not exist" in terminated["message"], terminated
    assert "torch.distributed" in logs or "torchrun" in logs or "tokenizer.path" in logs, logs[-2000:]
    assert status["reason"] == "ConfigError", status
    assert "tokenizer.path: /nonexistent/tokenizer does not exist" in status["message"], status
    assert (status["workers"]["desired"], status["workers"]["failed"], status.get("restarts", 0)) == (1, 1, 0), status
    # ... after reporting the worker on its way (Pending while it started, Running while torchrun ran)
    assert phases[0] == "Pending" and set(phases[:-1]) <= {"Pending", "Running"}, phases
    # Deleting the job: the operator's finalizer lets it go, and its objects are garbage-collected
    kubectl(release.kubeconfig, "delete", "-n", ns, "llmtrainingjob", name, "--wait=false")
    wait_for(lambda: kube.find(job_path) is None, timeout=60, what="the job to be deleted")
    wait_for(lambda: not kube.list(ns_path(ns, "pods"), labelSelector=f"kubetrain.io/job-name={name}"), timeout=60,
             what="the worker to go")


@explained
def test_killing_the_leader_hands_over_to_the_standby_and_it_comes_back_on_standby(
        release: Release, kube: Kube, local_cluster: Any) -> None:
    names = [p["metadata"]["name"] for p in operator_pods(kube, release)]
    leader = wait_for(lambda: holder(kube, release) in names and holder(kube, release), timeout=60,
                      what="a leader")
    standby = next(n for n in names if n != leader)
    node = local_cluster.node_of(kube, release.namespace, leader)
    killed = time.monotonic()
    node.kill(release.namespace, leader, "operator", signal.SIGKILL)
    wait_for(lambda: holder(kube, release) == standby, timeout=LEASE_SECONDS + 15,
             what=f"{standby} to take over the Lease")
    took = time.monotonic() - killed
    wait_for(lambda: leader_gauge(fresh(kube, release, standby)) == 1.0, timeout=30, what="the new leader's gauge")
    # The new leader operates: a job whose batch does not fit its workers is failed, without pods
    jobs = ns_path(release.jobs, "llmtrainingjobs", group="kubetrain.io", version="v1alpha1")
    kube.create(jobs, {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob", "metadata": {"name": "odd"},
                       "spec": spec_dict(training={"globalBatchSize": 16, "microBatchSize": 16})})
    status = wait_for(lambda: (st := kube.get(f"{jobs}/odd").get("status") or {}).get("phase") == "Failed" and st,
                      timeout=30, what="the new leader to fail the job")
    assert status["reason"] == "InvalidSpec" and "microBatchSize (16) must divide" in status["message"], status
    assert not kube.list(ns_path(release.jobs, "pods"), labelSelector="kubetrain.io/job-name=odd")
    kube.delete(f"{jobs}/odd")
    wait_for(lambda: kube.find(f"{jobs}/odd") is None, timeout=30, what="the new leader to release the job")

    def back() -> bool:
        pod = fresh(kube, release, leader)
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        return bool(restarts == 1 and ready(pod) and leader_gauge(pod) == 0.0)

    wait_for(back, timeout=90, what=f"{leader} restarted (restartPolicy Always), Ready and on standby")
    last = fresh(kube, release, leader)["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 128 + signal.SIGKILL
    assert holder(kube, release) == standby and leader_gauge(fresh(kube, release, standby)) == 1.0
    assert fresh(kube, release, standby)["status"]["containerStatuses"][0]["restartCount"] == 0
    print(f"hand-over {took:.1f}s after SIGKILL")


@explained
def test_helm_uninstall_removes_the_operator_and_its_pods_stop_gracefully(
        release: Release, kube: Kube, local_cluster: Any) -> None:
    """`helm uninstall` as one scenario (it can only happen once per release): the objects go, the
    operator's pods stop on SIGTERM with exit 0, and a job left behind can still be deleted (the pre-delete
    hook stopped the operator while its RBAC existed, so Kopf's finalizer was removed)."""
    jobs = ns_path(release.jobs, "llmtrainingjobs", group="kubetrain.io", version="v1alpha1")
    kube.create(jobs, {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob", "metadata": {"name": "kept"},
                       "spec": spec_dict(runPolicy={"suspend": True})})
    wait_for(lambda: "kubetrain.io/finalizer" in (kube.get(f"{jobs}/kept")["metadata"].get("finalizers") or []),
             timeout=30, what="Kopf's finalizer on the job")
    pods_path = ns_path(release.namespace, "pods")
    listing = kube.get(pods_path, labelSelector=release.selector)
    names = {p["metadata"]["name"] for p in listing["items"]}
    grace = listing["items"][0]["spec"]["terminationGracePeriodSeconds"]
    assert len(names) == 2
    # Until now, no API call of the operator was refused (the chart's RBAC is enough) and nothing crashed.
    # (During the uninstall the leader's last renewals are: Helm deletes the ServiceAccount and RBAC with the
    # Deployment, and its token stops working before the pods have stopped.)
    # (A watch the API server answers with 429 "storage is (re)initializing", its cache of a CRD just installed
    # by another test still warming up, is retried as the server asks: not a failure of the operator.)
    logs = "\n".join(line for line in operator_logs(local_cluster, release).splitlines()
                     if "storage is (re)initializing" not in line)
    for bad in ("Traceback", "Forbidden", "Unauthorized", "Request attempt"):
        assert bad not in logs, logs[logs.index(bad) - 2000:][:4000]
    started = time.monotonic()
    helm = subprocess.Popen([tool("helm"), "uninstall", release.name, "--kubeconfig", str(release.kubeconfig),
                             "--namespace", release.namespace, "--wait", "--timeout", "120s"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=release.env)
    last: dict[str, dict[str, Any]] = {}
    deleted: set[str] = set()
    for event in kube.watch(pods_path, listing["metadata"]["resourceVersion"], timeout_seconds=90,
                            labelSelector=release.selector):
        if event["type"] in ("MODIFIED", "DELETED"):
            pod = event["object"]
            last[pod["metadata"]["name"]] = pod
            if event["type"] == "DELETED":
                deleted.add(pod["metadata"]["name"])
        if deleted == names:
            break
    gone = time.monotonic() - started
    out, _ = helm.communicate(timeout=120)
    assert helm.returncode == 0, out
    assert deleted == names, f"pods not deleted: {names - deleted}"
    # Each container ended by itself on SIGTERM (exit 0), inside the grace period: not SIGKILLed
    for name, pod in last.items():
        state = pod["status"]["containerStatuses"][0]["state"]
        assert state.get("terminated", {}).get("exitCode") == 0, (name, state)
    assert gone < grace, gone
    for path in (f"/apis/apps/v1/namespaces/{release.namespace}/deployments/{release.fullname}-operator",
                 ns_path(release.namespace, "serviceaccounts", release.fullname),
                 ns_path(release.namespace, "services", f"{release.fullname}-metrics"),
                 f"/apis/rbac.authorization.k8s.io/v1/namespaces/{release.jobs}/roles/{release.fullname}-operator",
                 f"/apis/rbac.authorization.k8s.io/v1/namespaces/{release.jobs}/rolebindings/{release.fullname}-operator",
                 f"/apis/rbac.authorization.k8s.io/v1/namespaces/{release.namespace}/roles/"
                 f"{release.fullname}-leader-election",
                 f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{release.fullname}-view",
                 f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{release.fullname}-edit"):
        assert kube.find(path) is None, path
    assert not kube.list(f"/apis/apps/v1/namespaces/{release.namespace}/replicasets", labelSelector=release.selector)
    # Helm leaves the CRD (crds/ are installed, never deleted), so the jobs of other releases survive
    assert kube.find("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/llmtrainingjobs.kubetrain.io")
    assert kube.find(f"/apis/batch/v1/namespaces/{release.namespace}/jobs/{release.fullname}-uninstall") is None
    assert "kubetrain.io/finalizer" not in (kube.get(f"{jobs}/kept")["metadata"].get("finalizers") or [])
    kube.delete(f"{jobs}/kept")
    wait_for(lambda: kube.find(f"{jobs}/kept") is None, timeout=30, what="the job to go with no operator left")
    print(f"helm uninstall: pods gone after {gone:.1f}s")
