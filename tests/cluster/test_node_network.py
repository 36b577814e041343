"""The local node's network (tests/cluster/netns.py, kubelet_rules.hosts_file): cluster DNS from EndpointSlices
through /etc/hosts, and the bridge's fixed MAC."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from cluster.client import Kube
from cluster.pod_helpers import container_state, create, get, pod_manifest, python, wait_phase


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
