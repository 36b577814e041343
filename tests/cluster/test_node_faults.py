"""Faults on the local node (tests/cluster/control.py, agent.py): a signal or an OOM kill to PID 1, a lost
node; and a stopped node leaves no processes, namespaces, bridges or mounts behind."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from support import wait_for

from cluster.client import Kube
from cluster.pod_helpers import alive, container_state, create, get, pod_manifest, python, wait_phase


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
        wait_for(lambda: not alive(pid), timeout=10, what="the pod's processes to die")
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


def holds_for(condition: Any, seconds: float) -> None:
    """`condition` stays true, checked every 0.1 s, for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition()
        time.sleep(0.1)
