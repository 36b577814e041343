"""The local node runs a pod as a container runtime would (tests/cluster/runtime.py, volumes.py, container.py):
PID 1 of its own namespaces, its volumes, environment, ServiceAccount token, network and the image's user;
a missing reference waits in CreateContainerConfigError."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from support import ROOT, wait_for

from cluster import kubelet_rules as rules
from cluster.client import Kube
from cluster.pod_helpers import container_state, create, get, pod_manifest, python, wait_phase

REPORT = """
import json, os, socket, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
req = urllib.request.Request(f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
                             f"/api/v1/namespaces/{open(sa + '/namespace').read()}/pods/{os.environ['POD_NAME']}",
                             headers={"Authorization": "Bearer " + open(sa + "/token").read()})
try:
    api = urllib.request.urlopen(req, context=ctx, timeout=10).status
except urllib.error.HTTPError as e:
    api = e.code
mounts = {l.split()[1]: l.split()[2] for l in open("/proc/self/mounts")}
report = {
    "pid": os.getpid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "hostname": socket.gethostname(), "uid": os.getuid(), "gid": os.getgid(),
    "env": {k: os.environ.get(k) for k in ("FROM_VALUE", "EXPANDED", "POD_NAME", "POD_IP", "NODE", "LABEL",
                                            "FROM_SECRET", "FROM_CM", "PREFIX_a", "PREFIX_b", "HOME", "PATH")},
    "config": open("/etc/config/settings.json").read(), "renamed": open("/etc/secret/renamed").read(),
    "shm_fs": mounts.get("/dev/shm"), "scratch_fs": mounts.get("/scratch"), "api": api,
    "links": sorted(os.listdir("/sys/class/net")),
    "cwd": os.getcwd(), "hosts": open("/etc/hosts").read(),
}
open("/out/report.json", "w").write(json.dumps(report))
open("/dev/termination-log", "w").write("all done")
"""


def test_a_pod_runs_as_pid1_with_its_volumes_env_token_and_network(local_cluster: Any, kube: Kube, namespace: str,
                                                                   tmp_path: Path) -> None:
    """One pod, every kind of volume, env source and the network checked from inside it: one scenario,
    because a pod's start (namespaces, mounts, token request) is what costs, not the checks."""
    ns = namespace
    kube.create(f"/api/v1/namespaces/{ns}/configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                                        "metadata": {"name": "cm"},
                                                        "data": {"settings.json": '{"a": 1}', "key": "cm-value"}})
    kube.create(f"/api/v1/namespaces/{ns}/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                                     "stringData": {"password": "hunter2", "a": "1", "b": "2"}})
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    body = pod_manifest("report", python(REPORT), env=[
        {"name": "FROM_VALUE", "value": "plain"},
        {"name": "EXPANDED", "value": "$(FROM_VALUE)-and-$(POD_NAME)-$$(LITERAL)"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}},
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "key"}}},
    ], envFrom=[{"secretRef": {"name": "s"}, "prefix": "PREFIX_"}], volumeMounts=[
        {"name": "config", "mountPath": "/etc/config", "readOnly": True},
        {"name": "secret", "mountPath": "/etc/secret"},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/scratch"},
        {"name": "out", "mountPath": "/out"},
    ], terminationMessagePolicy="File")
    body["metadata"]["labels"] = {"app": "reporter"}
    body["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "cm", "items": [{"key": "settings.json", "path": "settings.json"}]}},
        {"name": "secret", "secret": {"secretName": "s", "items": [{"key": "password", "path": "renamed"}]}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "out", "hostPath": {"path": str(out), "type": "Directory"}},
    ]
    create(kube, ns, body)
    pod = wait_phase(kube, ns, "report", "Succeeded", "Failed")
    node = local_cluster.node_of(kube, ns, "report")
    state = container_state(pod)["state"]["terminated"]
    assert (state["exitCode"], state["reason"], state.get("message")) == (0, "Completed", "all done"), \
        node.logs(ns, "report")
    report = json.loads((out / "report.json").read_text())
    # PID 1 of its own PID namespace (it sees only its own processes), its own UTS and network namespace
    assert report["pid"] == 1 and report["pids"] == [1]
    assert report["hostname"] == "report"
    assert report["links"] == ["eth0", "lo"]
    assert pod["status"]["podIP"] == report["env"]["POD_IP"]
    assert ipaddress.ip_address(pod["status"]["podIP"]) in local_cluster.network.subnet
    # the trainer image's USER, HOME and WORKDIR (its Dockerfile), its venv first on PATH
    assert (report["uid"], report["gid"], report["cwd"]) == (10001, 10001, "/home/kubetrain")
    assert report["env"]["HOME"] == "/home/kubetrain"
    assert report["env"]["PATH"].split(":")[0] == str(ROOT / ".venv" / "bin")
    assert report["env"] | {"PATH": None, "HOME": None} == {
        "FROM_VALUE": "plain", "EXPANDED": "plain-and-$(POD_NAME)-$(LITERAL)", "POD_NAME": "report",
        "POD_IP": pod["status"]["podIP"], "NODE": pod["spec"]["nodeName"], "LABEL": "reporter",
        "FROM_SECRET": "hunter2", "FROM_CM": "cm-value", "PREFIX_a": "1", "PREFIX_b": "2", "PATH": None, "HOME": None}
    assert report["config"] == '{"a": 1}' and report["renamed"] == "hunter2"
    assert report["shm_fs"] == "tmpfs"
    assert report["api"] == 403  # the projected token authenticates (as the default account, which may not read pods)
    assert f"{pod['status']['podIP']}\treport" in report["hosts"]
    assert "kubernetes.default.svc" in report["hosts"]
    # The host's filesystem got none of the mount points
    for path in ("/etc/config", "/etc/secret", "/scratch", "/out", "/home/kubetrain", "/dev/termination-log"):
        assert not os.path.exists(path), path


def test_missing_configmap_and_secret_keys_wait_with_a_reason(local_cluster: Any, kube: Kube, namespace: str) -> None:
    create(kube, namespace, pod_manifest("needs-secret", ["true"], env=[
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]))
    pod = wait_for(lambda: (p := get(kube, namespace, "needs-secret")) and p["status"].get("containerStatuses") and
                   container_state(p)["state"].get("waiting", {}).get("reason") == "CreateContainerConfigError" and p,
                   timeout=60, what="CreateContainerConfigError")
    assert 'secret "absent" not found' in container_state(pod)["state"]["waiting"]["message"]
    kube.create(f"/api/v1/namespaces/{namespace}/secrets", {"apiVersion": "v1", "kind": "Secret",
                                                            "metadata": {"name": "absent"}, "stringData": {"k": "v"}})
    wait_phase(kube, namespace, "needs-secret", "Succeeded")



def test_the_images_users_resolve_and_home_comes_from_them(local_cluster: Any, kube: Kube, namespace: str) -> None:
    """The operator image's user (uid 10001, made by its Dockerfile's `useradd`; no HOME in its ENV) is in the
    container's /etc/passwd and /etc/group, and HOME is its home, as a container runtime sets it: Kopf's
    getpass.getuser() and kubernetes_asyncio's Path.home() work as in the real image."""
    ns = namespace
    body = pod_manifest("whoami", python("""
        import getpass, grp, os, pathlib
        me = f"{getpass.getuser()} {grp.getgrgid(os.getgid()).gr_name} {os.environ.get('HOME')} {pathlib.Path.home()}"
        open("/dev/termination-log", "w").write(me)
        """), terminationMessagePolicy="File", image="ghcr.io/kubetrain/operator:0.1.0")
    create(kube, ns, body)
    pod = wait_phase(kube, ns, "whoami", "Succeeded", "Failed")
    state = container_state(pod, "main")["state"]["terminated"]
    assert state.get("message") == "kubetrain kubetrain /home/kubetrain /home/kubetrain", \
        local_cluster.node_of(kube, ns, "whoami").logs(ns, "whoami")
    image = rules.image_from_dockerfile(ROOT / "operator" / "Dockerfile", Path("/venv"))
    assert image.users == ["kubetrain:x:10001:10001::/home/kubetrain:/usr/sbin/nologin"]
    passwd = rules.image_passwd(image, "root:x:0:0:root:/root:/bin/bash\n")
    assert rules.home_directory(10001, passwd) == "/home/kubetrain" and rules.home_directory(0, passwd) == "/root"
    assert rules.home_directory(4242, passwd) == "/"  # a user the image does not know: "/", as containerd
    assert rules.image_passwd(image, passwd) == passwd  # not twice
