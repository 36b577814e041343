"""The local node's agent: the process-wide part of a kubelet. `NodeAgent` registers the Node (Ready,
capacity, addresses, node info) and renews its Lease every 2 s (the full status every 20 s); follows its
pods, every Service and every EndpointSlice with reflectors (reflector.py); runs a `PodWorker` per pod
bound to it (pod_worker.py); answers the workers' questions (ConfigMaps and Secrets, the environment the
cluster adds, /etc/hosts) and posts their Events; and takes the faults the control API injects
(control.py). `run` is the node's main loop; `python -m cluster.node` (node.py) starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from . import kubelet_rules as rules
from .client import ApiError, Kube
from .control import serve_control
from .netns import Network
from .pod_worker import PodWorker
from .reflector import Reflector
from .runtime import Container

log = logging.getLogger("local-node")


class NodeAgent:
    """One local node, in its own process (see the module's docstring)."""

    def __init__(self, kube: Kube, name: str, index: int, network: Network, state: Path, images: dict[str, Any],
                 backoff: float = 10.0):
        self.kube, self.name, self.index, self.network, self.state = kube, name, index, network, state
        self.images = {k: rules.Image.from_json(v) for k, v in images.items()}
        self.backoff = backoff
        self.stopping = threading.Event()
        self.lost = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.RLock()
        self._pods = 0
        self.hosts_version = 0
        self.pods = Reflector(kube, "/api/v1/pods", self.on_pod, self.stopping, fieldSelector=f"spec.nodeName={name}")
        self.slices = Reflector(kube, "/apis/discovery.k8s.io/v1/endpointslices", self.on_dns, self.stopping)
        self.services = Reflector(kube, "/api/v1/services", self.on_dns, self.stopping)

    def next_pod(self) -> int:
        with self.lock:
            self._pods += 1
            return self._pods

    # -- registration and heartbeats ---------------------------------------------------------------------------

    def register(self) -> None:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "kubetrain.io/local-node": "true"}
        with contextlib.suppress(ApiError):
            self.kube.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                               "metadata": {"name": self.name, "labels": labels}, "spec": {}})
        self.node_status()

    def node_status(self) -> None:
        cpu = str(os.cpu_count() or 2)
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "100Gi",
                    "hugepages-2Mi": "0", "hugepages-1Gi": "0"}
        now = rules.now_iso()
        conds = [{"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": m, "lastHeartbeatTime": now,
                  "lastTransitionTime": now} for t, r, m in (
            ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"))]
        conds.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                      "message": "local node is posting ready status", "lastHeartbeatTime": now,
                      "lastTransitionTime": now})
        self.kube.patch(f"/api/v1/nodes/{self.name}/status", {"status": {
            "capacity": capacity, "allocatable": capacity, "conditions": conds,
            "addresses": [{"type": "InternalIP", "address": self.network.gateway},
                          {"type": "Hostname", "address": self.name}],
            "nodeInfo": {"machineID": uuid.uuid4().hex, "systemUUID": str(uuid.uuid4()), "bootID": str(uuid.uuid4()),
                         "kernelVersion": os.uname().release, "osImage": "kubetrain local node",
                         "containerRuntimeVersion": "local://processes", "kubeletVersion": "v1.36.2",
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}}}}, "strategic")
        log.info("node %s: Ready (%s cpus on this machine)", self.name, cpu)

    def heartbeat(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        last_status = time.monotonic()
        while not self.stopping.wait(2.0):
            if self.lost.is_set():
                continue
            body = {"spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": rules.now_micro()}}
            try:
                if self.kube.find(path) is None:
                    self.kube.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                                     {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                      "metadata": {"name": self.name}, **body})
                else:
                    self.kube.patch(path, body)
                if time.monotonic() - last_status > 20:
                    self.node_status()
                    last_status = time.monotonic()
            except (ApiError, requests.RequestException) as exc:
                log.warning("heartbeat: %s", exc)

    # -- pods -------------------------------------------------------------------------------------------------

    def on_pod(self, event: str, pod: dict[str, Any]) -> None:
        if self.lost.is_set() or self.stopping.is_set():
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if event == "DELETED":
                if worker is not None:
                    worker.gone = True
                    worker.changed.set()
                return
            if worker is not None:
                worker.update(pod)
                return
            if pod["metadata"].get("deletionTimestamp"):
                threading.Thread(target=self.final_delete, args=(pod["metadata"]["namespace"],
                                                                 pod["metadata"]["name"], uid), daemon=True).start()
                return
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return  # ran before (this node restarted): a kubelet would not run it again either
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]

    def final_delete(self, ns: str, name: str, uid: str) -> None:
        with contextlib.suppress(ApiError, requests.RequestException):
            self.kube.delete(f"/api/v1/namespaces/{ns}/pods/{name}",
                             {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                              "preconditions": {"uid": uid}})

    def find_object(self, ns: str, kind: str, name: str) -> dict[str, Any] | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        return self.kube.find(f"/api/v1/namespaces/{ns}/{plural}/{name}")  # type: ignore[no-any-return]

    def env_objects(self, ns: str) -> dict[tuple[str, str], Any]:
        out = {}
        for kind, plural in (("ConfigMap", "configmaps"), ("Secret", "secrets")):
            for obj in self.kube.list(f"/api/v1/namespaces/{ns}/{plural}"):
                out[(kind, obj["metadata"]["name"])] = obj
        return out

    def base_env(self, pod: dict[str, Any]) -> dict[str, str]:
        host, port = "kubernetes.default.svc", str(self.network.api_port)
        return {"HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
                "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}",
                "KUBERNETES_PORT_443_TCP": f"tcp://{host}:{port}", "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
                "KUBERNETES_PORT_443_TCP_PORT": port, "KUBERNETES_PORT_443_TCP_ADDR": host}

    def event(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        now = rules.now_iso()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta["uid"]},
                "reason": reason, "message": message[:1024], "type": kind,
                "source": {"component": "kubelet", "host": self.name}, "firstTimestamp": now, "lastTimestamp": now,
                "count": 1, "reportingComponent": "kubelet", "reportingInstance": self.name}
        with contextlib.suppress(ApiError, requests.RequestException):
            self.kube.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)

    # -- DNS ----------------------------------------------------------------------------------------------------

    def on_dns(self, event: str, obj: dict[str, Any]) -> None:
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.write_hosts()

    def hosts_for(self, pod: dict[str, Any], ip: str) -> str:
        services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s
                    for s in list(self.services.objects.values())}
        return rules.hosts_file(pod, ip, self.network.gateway, list(self.slices.objects.values()), services)

    # -- faults -------------------------------------------------------------------------------------------------

    def find_container(self, ns: str, pod: str, container: str | None) -> Container:
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            if w.ns == ns and w.pod_name == pod:
                for c in w.inits + w.containers:
                    if container in (None, c.name) and c.running():
                        return c
        raise KeyError(f"no running container {container} in {ns}/{pod} on {self.name}")

    def lose(self) -> None:
        """The node vanishes: no more heartbeats or status, and its pods die unreported."""
        self.lost.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.lost = True
            for c in w.inits + w.containers:
                c.signal(signal.SIGKILL)
            w.changed.set()

    def describe(self) -> list[dict[str, Any]]:
        with self.lock:
            workers = list(self.workers.values())
        return [{"namespace": w.ns, "name": w.pod_name, "uid": w.uid, "ip": w.ip, "netns": w.netns, "dir": str(w.dir),
                 "containers": {c.name: {"pid": c.pid1 if c.running() else None, "restarts": c.restarts,
                                         "log": str(c.log_path()), "state": c.state}
                                for c in w.inits + w.containers}} for w in workers]

    # -- main ---------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Register, start following the API, serve the control API, and on `stopping` (SIGTERM) stop the
        pods and remove the Node and its Lease (a lost node leaves them, as a vanished machine would)."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.register()
        for r in (self.services, self.slices):
            r.start()
        for r in (self.services, self.slices):
            r.synced.wait(30)  # pods' /etc/hosts are written from these: have them before the first pod
        threading.Thread(target=self.heartbeat, daemon=True, name="heartbeat").start()
        self.pods.start()
        server = serve_control(self)
        self.stopping.wait()
        server.shutdown()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.changed.set()
            w.join(timeout=30)
        if not self.lost.is_set():
            with contextlib.suppress(ApiError, requests.RequestException):
                self.kube.delete(f"/api/v1/nodes/{self.name}")
            with contextlib.suppress(ApiError, requests.RequestException):
                self.kube.delete(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}")

