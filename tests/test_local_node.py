"""The local node (tests/cluster/node.py) on the real control plane: each kubelet behaviour that the
operator's tests rely on, with real processes in namespaces of their own; and the kubelet rules
(tests/cluster/kubelet_rules.py) as pure functions."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cluster import kubelet_rules as rules
from cluster.client import Kube
from support import ROOT, wait_for

IMAGE = "kubetrain/trainer:test"  # the node's image map: this checkout's .venv
PY = "python"


def pod_manifest(name: str, command: list[str], restart: str = "Never", grace: int = 5,
                 **container: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": grace,
                     "containers": [{"name": "main", "image": IMAGE, "command": command, **container}]}}


def create(kube: Kube, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    return dict(kube.create(f"/api/v1/namespaces/{ns}/pods", body))


def get(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    return kube.find(f"/api/v1/namespaces/{ns}/pods/{name}")  # type: ignore[no-any-return]


def wait_phase(kube: Kube, ns: str, name: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (p := get(kube, ns, name)) and p["status"].get("phase") in phases and p,  # type: ignore[no-any-return]
                    timeout=timeout, what=f"pod {name} {phases}")


def container_state(pod: dict[str, Any], name: str = "main") -> dict[str, Any]:
    statuses = pod["status"].get("containerStatuses", []) + pod["status"].get("initContainerStatuses", [])
    return next((c for c in statuses if c["name"] == name), {"state": {}})  # type: ignore[no-any-return]


def condition(pod: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in pod["status"].get("conditions") or [] if c["type"] == kind), None)


def python(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# --- one pod as a container runtime runs it ----------------------------------------------------------------


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


# --- cluster DNS from EndpointSlices --------------------------------------------------------------------------


def test_headless_service_names_resolve_as_cluster_dns_would(local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    for name, publish in (("workers", True), ("ready-only", False)):
        kube.create(f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": publish, "selector": {"app": "dns"},
                     "ports": [{"name": "p", "port": 7000}]}})
    server = pod_manifest("server", python("""
        import socket, signal, sys
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        s = socket.socket(); s.bind(("0.0.0.0", 7000)); s.listen()
        while True:
            c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()
        """), readinessProbe={"exec": {"command": ["false"]}, "periodSeconds": 1})  # never ready
    server["metadata"]["labels"] = {"app": "dns"}
    server["spec"].update(hostname="server", subdomain="workers")
    create(kube, ns, server)
    wait_phase(kube, ns, "server", "Running")
    client = pod_manifest("client", python(f"""
        import socket, sys, time
        for _ in range(300):
            try:
                addr = socket.gethostbyname("server.workers.{ns}.svc.cluster.local")
                break
            except OSError:
                time.sleep(0.1)
        short = socket.gethostbyname("server.workers")
        s = socket.create_connection(("server.workers.{ns}.svc", 7000), timeout=10)
        name = s.recv(100).decode()
        try:
            socket.gethostbyname("server.ready-only.{ns}.svc")
            unready = "resolved"
        except OSError:
            unready = "absent"
        open("/dev/termination-log", "w").write(f"{{addr}} {{short}} {{name}} {{unready}}")
        """))
    create(kube, ns, client)
    pod = wait_phase(kube, ns, "client", "Succeeded", "Failed")
    server_ip = get(kube, ns, "server")["status"]["podIP"]  # type: ignore[index]
    node = local_cluster.node_of(kube, ns, "client")
    message = container_state(pod)["state"]["terminated"].get("message")
    # publishNotReadyAddresses: the not-ready server resolves through "workers", not through "ready-only"
    assert message == f"{server_ip} {server_ip} server absent", node.logs(ns, "client")


# --- lifecycle --------------------------------------------------------------------------------------------------


def test_readiness_probe_and_restart_policy(local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    web = pod_manifest("web", python("""
        import http.server, os, signal, sys
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        http.server.HTTPServer(("0.0.0.0", 8000), http.server.SimpleHTTPRequestHandler).serve_forever()
        """), readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        ports=[{"name": "http", "containerPort": 8000}])
    create(kube, ns, web)
    pod = wait_for(lambda: (p := get(kube, ns, "web")) and condition(p, "Ready") == "True" and p, timeout=60,
                   what="Ready")
    assert container_state(pod)["ready"] is True and pod["status"]["phase"] == "Running"
    # OnFailure: a failing container is restarted with back-off, restartCount counts, lastState keeps the exit
    flaky = pod_manifest("flaky", ["sh", "-c", "test -e /tmp/again && exit 0; touch /tmp/again; exit 7"],
                         restart="OnFailure")
    create(kube, ns, flaky)
    pod = wait_phase(kube, ns, "flaky", "Succeeded", timeout=90)
    status = container_state(pod)
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0


def test_a_failing_liveness_probe_restarts_the_container_under_restart_policy_always(
        local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    # Alive while /tmp/alive exists; the first run removes it after a moment, the restarted run keeps it
    # (/tmp is the pod's, so it survives the restart: the marker tells the runs apart).
    body = pod_manifest("liveness", ["sh", "-c", "if [ -e /tmp/second ]; then touch /tmp/alive; exec sleep 1000; fi; "
                                     "touch /tmp/alive /tmp/second; sleep 2; rm /tmp/alive; exec sleep 1000"],
                        restart="Always", grace=1,
                        livenessProbe={"exec": {"command": ["test", "-e", "/tmp/alive"]}, "periodSeconds": 1,
                                       "failureThreshold": 2})
    create(kube, ns, body)
    pod = wait_for(lambda: (p := get(kube, ns, "liveness")) and container_state(p).get("restartCount") == 1 and
                   "running" in container_state(p)["state"] and p, timeout=90, what="a liveness restart")
    last = container_state(pod)["lastState"]["terminated"]
    assert last["exitCode"] == 137  # sleep as PID 1 ignores SIGTERM: killed after the 1 s grace period
    assert pod["status"]["phase"] == "Running"
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=liveness")
    assert {"Unhealthy", "Killing", "BackOff"} <= {e["reason"] for e in events}


def test_fallback_to_logs_init_containers_and_unknown_images(local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    create(kube, ns, pod_manifest("crash", ["sh", "-c", "echo first line; echo the reason >&2; exit 3"],
                                  terminationMessagePolicy="FallbackToLogsOnError"))
    body = pod_manifest("with-init", ["sh", "-c", "cat /work/ready > /dev/termination-log"],
                        volumeMounts=[{"name": "w", "mountPath": "/work"}])
    body["spec"]["initContainers"] = [{"name": "setup", "image": IMAGE,
                                       "command": ["sh", "-c", "echo ok > /work/ready"],
                                       "volumeMounts": [{"name": "w", "mountPath": "/work"}]}]
    body["spec"]["volumes"] = [{"name": "w", "emptyDir": {}}]
    create(kube, ns, body)
    create(kube, ns, {**pod_manifest("unknown", ["true"]), "spec": {
        "restartPolicy": "Never", "containers": [{"name": "main", "image": "registry.invalid/nothing:1"}]}})
    crash = wait_phase(kube, ns, "crash", "Failed")
    term = container_state(crash)["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert term["message"].splitlines() == ["first line", "the reason"]
    init = wait_phase(kube, ns, "with-init", "Succeeded")
    assert container_state(init, "setup")["state"]["terminated"]["exitCode"] == 0
    assert container_state(init)["state"]["terminated"]["message"] == "ok\n"
    unknown = wait_for(lambda: (p := get(kube, ns, "unknown")) and p["status"].get("containerStatuses") and
                       container_state(p)["state"].get("waiting", {}).get("reason") in ("ErrImagePull",
                                                                                        "ImagePullBackOff") and p,
                       timeout=60, what="ErrImagePull")
    assert unknown["status"]["phase"] == "Pending"


def test_graceful_deletion_sigterm_then_sigkill_and_the_final_delete(local_cluster: Any, kube: Kube,
                                                                     namespace: str) -> None:
    ns = namespace
    polite = pod_manifest("polite", python("""
        import signal, sys, time
        def term(*a):
            open("/dev/termination-log", "w").write("got SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        open("/tmp/handling-sigterm", "w").close()
        while True:
            time.sleep(0.05)
        """), grace=30, readinessProbe={"exec": {"command": ["test", "-e", "/tmp/handling-sigterm"]},
                                      "periodSeconds": 1})
    stubborn = pod_manifest("stubborn", ["sleep", "1000"], grace=2)  # PID 1 without a handler ignores SIGTERM
    stubborn["metadata"]["finalizers"] = ["kubetrain.io/test-hold"]
    for body in (polite, stubborn):
        create(kube, ns, body)
    for name in ("polite", "stubborn"):  # Ready: PID 1 has its SIGTERM handler (else SIGTERM would be ignored)
        wait_for(lambda n=name: (p := get(kube, ns, n)) and condition(p, "Ready") == "True", timeout=60,
                 what=f"{name} ready")
    nodes = {n: local_cluster.node_of(kube, ns, n) for n in ("polite", "stubborn")}
    pids = {n: nodes[n].pod(ns, n)["containers"]["main"]["pid"] for n in nodes}
    kube.delete(f"/api/v1/namespaces/{ns}/pods/polite")
    kube.delete(f"/api/v1/namespaces/{ns}/pods/stubborn")
    # Terminating: the API server keeps them until the node's final delete
    assert get(kube, ns, "polite") is None or get(kube, ns, "polite")["metadata"].get("deletionTimestamp")  # type: ignore[index]
    wait_for(lambda: get(kube, ns, "polite") is None, timeout=30, what="polite gone after SIGTERM")
    assert not _alive(pids["polite"])
    # The stubborn one is killed after its 2 s grace period; its finalizer keeps the object, with the exit
    held = wait_for(lambda: (p := get(kube, ns, "stubborn")) and "terminated" in container_state(p)["state"] and p,
                    timeout=30, what="stubborn killed")
    assert container_state(held)["state"]["terminated"]["exitCode"] == 137
    assert held["status"]["phase"] == "Failed"
    assert not _alive(pids["stubborn"])
    kube.patch(f"/api/v1/namespaces/{ns}/pods/stubborn", {"metadata": {"finalizers": None}})
    wait_for(lambda: get(kube, ns, "stubborn") is None, timeout=30, what="stubborn gone")


def holds_for(condition: Any, seconds: float) -> None:
    """`condition` stays true, checked every 0.1 s, for `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition()
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


# --- faults -----------------------------------------------------------------------------------------------------


def test_fault_injection_kill_and_oom(local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    for name in ("killed", "oom"):
        create(kube, ns, pod_manifest(name, python("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
            while True:
                time.sleep(0.05)
            """)))
    for name in ("killed", "oom"):
        wait_for(lambda n=name: (p := get(kube, ns, n)) and "running" in container_state(p)["state"], timeout=60,
                 what=f"{name} running")
    local_cluster.node_of(kube, ns, "killed").kill(ns, "killed", sig=signal.SIGKILL)
    local_cluster.node_of(kube, ns, "oom").oom(ns, "oom")
    killed = wait_phase(kube, ns, "killed", "Failed")
    assert {k: container_state(killed)["state"]["terminated"][k] for k in ("exitCode", "reason")} == \
        {"exitCode": 137, "reason": "Error"}
    oom = wait_phase(kube, ns, "oom", "Failed")
    assert {k: container_state(oom)["state"]["terminated"][k] for k in ("exitCode", "reason")} == \
        {"exitCode": 137, "reason": "OOMKilled"}


def test_a_lost_node_stops_heartbeats_and_its_pods_die_unreported(control_plane: Any, kube: Kube, namespace: str,
                                                                  tmp_path: Path) -> None:
    """On a node of its own (losing one is for good), which is then stopped and must leave nothing behind."""
    from cluster.bed import LocalCluster

    bed = LocalCluster.start(control_plane, tmp_path / "nodes", names=("node-lost",))
    try:
        body = pod_manifest("victim", ["sleep", "1000"])
        body["spec"]["nodeName"] = "node-lost"
        create(kube, namespace, body)
        node = bed.node("node-lost")
        wait_for(lambda: (p := get(kube, namespace, "victim")) and "running" in container_state(p)["state"],
                 timeout=60, what="victim running")
        info = node.pod(namespace, "victim")
        pid = info["containers"]["main"]["pid"]
        lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-lost"
        wait_for(lambda: kube.find(lease), timeout=30, what="the node's Lease")
        node.lose()
        wait_for(lambda: not _alive(pid), timeout=10, what="the pod's processes to die")
        renewed = kube.get(lease)["spec"]["renewTime"]
        before = get(kube, namespace, "victim")
        # For longer than the node's 2 s heartbeat period, nothing is written: no renewal, no pod status.
        holds_for(lambda: kube.get(lease)["spec"]["renewTime"] == renewed and
                  get(kube, namespace, "victim")["status"] == before["status"], seconds=5)  # type: ignore[index]
        assert before["status"]["phase"] == "Running"  # type: ignore[index]
    finally:
        bed.stop()
    _assert_nothing_left(bed)


def test_a_stopped_node_leaves_no_processes_namespaces_bridges_or_mounts(control_plane: Any, kube: Kube,
                                                                        namespace: str, tmp_path: Path) -> None:
    from cluster.bed import LocalCluster

    bed = LocalCluster.start(control_plane, tmp_path / "nodes", names=("node-clean",))
    try:
        body = pod_manifest("busy", ["sleep", "1000"], volumeMounts=[{"name": "m", "mountPath": "/m"}])
        body["spec"]["volumes"] = [{"name": "m", "emptyDir": {"medium": "Memory"}}]
        body["spec"]["nodeName"] = "node-clean"
        create(kube, namespace, body)
        wait_for(lambda: (p := get(kube, namespace, "busy")) and "running" in container_state(p)["state"],
                 timeout=60, what="busy running")
        assert _mounts_under(tmp_path), "the Memory volume is a tmpfs while the pod runs"
    finally:
        bed.stop()
    _assert_nothing_left(bed)
    assert not _mounts_under(tmp_path)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


def _assert_nothing_left(bed: Any) -> None:
    tag = bed.network.tag
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert tag not in links
    assert not list(Path("/run/netns").glob(f"{tag}-*")) if Path("/run/netns").exists() else True
    for n in bed.nodes:
        assert n.proc.poll() is not None
        state = str(n.state)
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert state not in cmdline, f"process {proc.name} left behind: {cmdline}"


# --- the rules, directly ----------------------------------------------------------------------------------------


def test_var_expansion_as_kubernetes_does() -> None:
    env = {"A": "x", "B": "y"}
    assert rules.expand("$(A)-$(B)", env) == "x-y"
    assert rules.expand("$$(A) $(MISSING) $", env) == "$(A) $(MISSING) $"


def test_image_config_comes_from_the_dockerfile() -> None:
    image = rules.image_from_dockerfile(ROOT / "operator" / "Dockerfile", Path("/venv"))
    assert image.entrypoint == ["kubetrain"] and image.cmd[0] == "operator"
    assert image.user == "10001:10001"
    assert image.env["PATH"].split(":")[0] == "/venv/bin" and "/opt/kubetrain/bin" not in image.env["PATH"]
    cmd = rules.container_command({"args": ["operator", "-n", "$(NS)"]}, image, {"NS": "ml"})
    assert cmd == ["kubetrain", "operator", "-n", "ml"]
    assert rules.resolve_image("ghcr.io/kubetrain/operator:0.1.0", {"ghcr.io/kubetrain/operator": image}) is image
    assert rules.resolve_image("ghcr.io/kubetrain/other:1", {"ghcr.io/kubetrain/operator": image}) is None


def test_run_as_non_root_refuses_root() -> None:
    image = rules.Image(venv="/v")
    pod = {"spec": {"securityContext": {"runAsNonRoot": True}}}
    with pytest.raises(rules.ConfigError, match="runAsNonRoot"):
        rules.container_user(pod, {}, image)
    assert rules.container_user({"spec": {"securityContext": {"runAsUser": 5, "fsGroup": 9}}}, {}, image) == (5, 5, [9])


def test_hosts_file_lists_ready_endpoints_of_headless_services_only() -> None:
    pod = {"metadata": {"namespace": "ml", "name": "j-worker-1"}, "spec": {"hostname": "j-worker-1", "subdomain": "j"}}
    services = {("ml", "j"): {"spec": {"clusterIP": "None"}}, ("ml", "web"): {"spec": {"clusterIP": "10.96.0.9"}}}
    slices = [{"metadata": {"namespace": "ml", "labels": {"kubernetes.io/service-name": "j"}},
               "endpoints": [{"addresses": ["10.1.0.2"], "hostname": "j-worker-0", "conditions": {"ready": True}},
                             {"addresses": ["10.1.0.5"], "hostname": "j-worker-2", "conditions": {"ready": False}}]},
              {"metadata": {"namespace": "ml", "labels": {"kubernetes.io/service-name": "web"}},
               "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": True}}]}]
    text = rules.hosts_file(pod, "10.1.0.3", "10.1.0.1", slices, services)
    lines = {line.split("\t")[0]: line.split("\t")[1].split() for line in text.splitlines() if "\t" in line}
    assert "j-worker-0.j.ml.svc.cluster.local" in lines["10.1.0.2"] and "j-worker-0.j" in lines["10.1.0.2"]
    assert "10.1.0.5" not in lines and "10.1.0.7" not in lines
    assert lines["10.1.0.3"][0] == "j-worker-1.j.ml.svc.cluster.local"
    assert "kubernetes.default.svc" in lines["10.1.0.1"]


def test_pod_phase_and_termination_messages() -> None:
    term = {"state": {"terminated": {"exitCode": 1}}}
    ok = {"state": {"terminated": {"exitCode": 0}}}
    assert rules.pod_phase("Never", False, True, [term]) == "Failed"
    assert rules.pod_phase("OnFailure", False, True, [term]) == "Running"
    assert rules.pod_phase("OnFailure", False, True, [ok]) == "Succeeded"
    assert rules.pod_phase("Never", False, False, []) == "Pending"
    assert rules.pod_phase("Never", True, False, []) == "Failed"
    logs = b"".join(b"line %d\n" % i for i in range(200))
    assert rules.termination_message(b"", logs, "FallbackToLogsOnError", 1).splitlines()[0] == "line 120"
    assert rules.termination_message(b"", logs, "FallbackToLogsOnError", 0) == ""
    assert rules.termination_message(b"mine", logs, "FallbackToLogsOnError", 1) == "mine"


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_control_plane_skips_outside_ci_and_fails_the_run_in_ci(ci: str, tmp_path: Path) -> None:
    env = {**os.environ, "KUBETRAIN_K8S_ASSETS": str(tmp_path / "nowhere"), "CI": ci}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             "tests/test_local_node.py::test_missing_configmap_and_secret_keys_wait_with_a_reason"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "nowhere/up.sh is missing" in result.stdout, result.stdout
    if ci:
        assert result.returncode != 0 and "CI=true needs the control plane" in result.stdout
    else:
        assert result.returncode == 0 and "1 skipped" in result.stdout


# --- what the chart's operator pods needed (tests/test_chart_install.py) ---------------------------------------


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


def test_a_liveness_probe_failing_fewer_times_than_its_threshold_does_not_restart(local_cluster: Any, kube: Kube,
                                                                                namespace: str) -> None:
    ns = namespace
    # Not alive for its first 1.5 s (probes every second, five failures allowed), alive after: never restarted
    alive = {"exec": {"command": ["test", "-e", "/tmp/alive"]}, "periodSeconds": 1}
    body = pod_manifest("slow-start", ["sh", "-c", "sleep 1.5; touch /tmp/alive; exec sleep 1000"], restart="Always",
                        grace=1, livenessProbe={**alive, "failureThreshold": 5}, readinessProbe=alive)
    create(kube, ns, body)
    pod = wait_for(lambda: (p := get(kube, ns, "slow-start")) and condition(p, "Ready") == "True" and p, timeout=60,
                   what="slow-start Ready")
    status = container_state(pod)
    assert status["restartCount"] == 0 and "running" in status["state"], status
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=slow-start")
    assert "Killing" not in {e["reason"] for e in events}


def test_the_bridge_keeps_its_mac_when_pods_come_and_go(local_cluster: Any) -> None:
    """Else the bridge takes its lowest port's MAC and changes it when that pod goes: the other pods, still
    sending to the old gateway MAC, cannot reach the API server's forwarder until their ARP entries expire."""
    net = local_cluster.network
    mac = Path(f"/sys/class/net/{net.tag}/address").read_text()
    names = [f"{net.tag}-mac{i}" for i in range(3)]
    addresses = [net.allocate() for _ in names]
    try:
        for name, address in zip(names, addresses, strict=True):
            net.create_pod_netns(name, address)
        # a port with a MAC below any other (a bridge without its own would take it)
        subprocess.run(["ip", "link", "set", "v" + names[0].removeprefix("kt")[:14], "address", "02:00:00:00:00:01"],
                       check=True)
        assert Path(f"/sys/class/net/{net.tag}/address").read_text() == mac
        for name in names[:2]:
            net.delete_pod_netns(name)
        assert Path(f"/sys/class/net/{net.tag}/address").read_text() == mac
    finally:
        for name, address in zip(names, addresses, strict=True):
            net.delete_pod_netns(name)
            net.release(address)
