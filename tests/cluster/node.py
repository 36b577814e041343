"""A local node: a process that does a kubelet's job for the test bed's real control plane, running each
pod bound to it as local processes (see docs/testing.md, "The test bed").

    python -m cluster.node --kubeconfig K --name N --network NET.json --state DIR --images IMAGES.json

It registers Node `N` (Ready, with a Lease heartbeat), watches the pods bound to it, and for each:
a network namespace on the test bridge with a pod IP; /etc/hosts from the cluster's EndpointSlices;
volumes (configMap, secret, emptyDir — Memory is a tmpfs —, hostPath, downwardAPI, projected
ServiceAccount tokens from the TokenRequest API); the environment (value, fieldRef, secretKeyRef,
configMapKeyRef, resourceFieldRef, envFrom, $(VAR)); each container as PID 1 of its own namespaces
(container.py), with its image taken from the image map (other images wait in ErrImagePull); status
(phase, conditions, container states with exit codes, reasons and termination messages), readiness and
liveness probes, restartPolicy with back-off, and graceful deletion (SIGTERM to PID 1, SIGKILL after the
grace period, then the final delete with grace 0).

Fault injection over a small HTTP API on 127.0.0.1 (its port is written to STATE/control-port):
POST /kill {namespace, pod, container, signal}, POST /oom {namespace, pod, container}, POST /lose (the
node stops heartbeating and reporting, and its pods die unreported); GET /pods.
The `LocalNode` class at the end is the test side: it starts this process and talks to it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from . import kubelet_rules as rules
from .client import ApiError, Kube
from .netns import Network, _die_with_parent

log = logging.getLogger("local-node")
SHIM = Path(__file__).with_name("container.py")
MIN_KILL_GRACE = 2  # a pod force-deleted from the API still gets SIGTERM and this long (as the kubelet)


# --- watching the API ---------------------------------------------------------------------------------------


class Reflector(threading.Thread):
    """List, then watch, a collection; keeps `objects` (by uid) current and calls `on_change(event, obj)`.
    Relists after an expired resourceVersion or any error."""

    def __init__(self, kube: Kube, path: str, on_change: Any, stop: threading.Event, **params: Any):
        super().__init__(daemon=True, name=f"reflector {path}")
        self.kube, self.path, self.params, self.on_change, self.stop = kube, path, params, on_change, stop
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()

    def _notify(self, event: str, obj: dict[str, Any]) -> None:
        try:
            self.on_change(event, obj)
        except Exception:
            log.exception("%s: handling %s %s", self.path, event, obj["metadata"].get("name"))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                listing = self.kube.get(self.path, **self.params)
                fresh = {o["metadata"]["uid"]: o for o in listing.get("items") or []}
                for uid, obj in list(self.objects.items()):
                    if uid not in fresh:
                        del self.objects[uid]
                        self._notify("DELETED", obj)
                for uid, obj in fresh.items():
                    self.objects[uid] = obj
                    self._notify("MODIFIED", obj)
                self.synced.set()
                rv = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    for event in self.kube.watch(self.path, rv, timeout_seconds=30, **self.params):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), str(obj.get("reason")), str(obj.get("message")))
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        uid = obj["metadata"]["uid"]
                        if event["type"] == "DELETED":
                            self.objects.pop(uid, None)
                        else:
                            self.objects[uid] = obj
                        self._notify(event["type"], obj)
                        if self.stop.is_set():
                            return
            except (ApiError, requests.RequestException, ValueError, KeyError) as exc:
                if not self.stop.is_set():
                    log.debug("%s: %s; listing again", self.path, exc)
                    self.stop.wait(0.5)


# --- one container ----------------------------------------------------------------------------------------


@dataclass
class Container:
    spec: dict[str, Any]
    dir: Path
    init: bool = False
    restarts: int = 0
    proc: subprocess.Popen[bytes] | None = None
    pid1: int | None = None
    started_at: str | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    oom: bool = False
    next_start: float = 0.0
    backoff: float = 0.0
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    killed_by_liveness: bool = False

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_path(self) -> Path:
        return self.dir / f"{self.restarts}.log"

    def signal(self, sig: int) -> bool:
        if self.pid1 is None or not self.running():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid1, sig)
        return True

    def status(self, image: str) -> dict[str, Any]:
        return {"name": self.name, "image": image, "imageID": f"local://{image}",
                "containerID": f"local://{self.pid1}" if self.pid1 else None,
                "ready": self.ready, "started": "running" in self.state, "restartCount": self.restarts,
                "state": self.state, "lastState": self.last_state}


# --- one pod ------------------------------------------------------------------------------------------------


class PodWorker(threading.Thread):
    """Runs one pod from admission to its final delete (or until the node stops or is lost)."""

    def __init__(self, node: NodeAgent, pod: dict[str, Any]):
        super().__init__(daemon=True, name=f"pod {pod['metadata']['namespace']}/{pod['metadata']['name']}")
        self.node, self.pod = node, pod
        meta = pod["metadata"]
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = node.state / "pods" / f"{self.ns}_{self.pod_name}_{self.uid}"
        self.netns = f"{node.network.tag}-{node.index}p{node.next_pod()}"
        self.ip: str | None = None
        self.changed = threading.Event()
        self.gone = False  # removed from the API
        self.lost = False  # the node was lost: die without a word
        self.containers = [Container(c, self.dir / "c" / c["name"]) for c in pod["spec"].get("containers") or []]
        self.inits = [Container(c, self.dir / "i" / c["name"], init=True)
                      for c in pod["spec"].get("initContainers") or []]
        self.tmpfs: list[Path] = []
        self.mounts: dict[str, Path] = {}
        self.sandbox = False
        self.initialized = not self.inits
        self.init_failed = False
        self.sent: dict[str, Any] | None = None
        self.conditions: list[dict[str, Any]] = []
        self.start_time = rules.now_iso()
        self.hosts = self.dir / "hosts"

    # -- the API ------------------------------------------------------------------------------------------

    @property
    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy") or "Always")

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        self.changed.set()

    def event(self, reason: str, message: str, kind: str = "Normal") -> None:
        if self.lost:
            return
        self.node.event(self.pod, reason, message, kind)

    def report(self) -> None:
        if self.gone or self.lost:
            return
        statuses = [c.status(c.spec.get("image", "")) for c in self.containers]
        inits = [c.status(c.spec.get("image", "")) for c in self.inits]
        phase = rules.pod_phase(self.restart_policy, self.init_failed, self.initialized, statuses)
        self.conditions = rules.conditions(self.sandbox, self.initialized, statuses, self.conditions)
        status: dict[str, Any] = {"phase": phase, "conditions": self.conditions, "containerStatuses": statuses,
                                  "hostIP": self.node.network.gateway, "hostIPs": [{"ip": self.node.network.gateway}],
                                  "startTime": self.start_time}
        if inits:
            status["initContainerStatuses"] = inits
        if self.ip:
            status["podIP"], status["podIPs"] = self.ip, [{"ip": self.ip}]
        if status == self.sent:
            return
        try:
            self.node.kube.patch(f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status", {"status": status},
                                 "strategic")
            self.sent = status
        except ApiError as exc:
            if exc.status == 404:
                self.gone = True
            else:
                log.warning("%s: status: %s", self.name, exc)
        except requests.RequestException as exc:
            log.warning("%s: status: %s", self.name, exc)

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    # -- the sandbox and volumes ----------------------------------------------------------------------------

    def setup_sandbox(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(mode=0o1777, exist_ok=True)
        (self.dir / "tmp").chmod(0o1777)
        self.ip = self.node.network.allocate()
        self.node.network.create_pod_netns(self.netns, self.ip)
        self.write_hosts()
        spec = self.pod["spec"]
        (self.dir / "hostname").write_text((spec.get("hostname") or self.pod_name) + "\n")
        self.sandbox = True

    def write_hosts(self) -> None:
        if self.ip is None:
            return
        text = self.node.hosts_for(self.pod, self.ip)
        try:
            if self.hosts.exists() and self.hosts.read_text() == text:
                return
            # In place (same inode): the containers see it through their bind mounts.
            with open(self.hosts, "a+") as f:
                f.seek(0)
                f.truncate()
                f.write(text)
        except OSError as exc:
            log.warning("%s: hosts: %s", self.name, exc)

    def prepare_volumes(self) -> None:
        """Every volume as a host directory (raises rules.ConfigError while a source is missing)."""
        spec = self.pod["spec"]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        for vol in spec.get("volumes") or []:
            name = vol["name"]
            if name in self.mounts:
                continue
            path = self.dir / "volumes" / name
            if "hostPath" in vol:
                host = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                    host.mkdir(parents=True, exist_ok=True)
                if not host.exists():
                    raise rules.ConfigError(f"hostPath {host} does not exist")
                self.mounts[name] = host
                continue
            files: dict[str, tuple[bytes, int]] = {}
            if "emptyDir" in vol:
                path.mkdir(parents=True, exist_ok=True)
                if (vol["emptyDir"] or {}).get("medium") == "Memory":
                    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(path)], check=True)
                    self.tmpfs.append(path)
                path.chmod(0o777)
                self.mounts[name] = path
                continue
            if "configMap" in vol or "secret" in vol:
                files = self.object_files(vol)
            elif "downwardAPI" in vol:
                files = self.downward_files(vol["downwardAPI"])
            elif "projected" in vol:
                mode = vol["projected"].get("defaultMode", 0o644)
                for source in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        files[source["serviceAccountToken"]["path"]] = (self.token(source["serviceAccountToken"]),
                                                                        mode)
                    elif "configMap" in source or "secret" in source:
                        files.update(self.object_files(source, mode))
                    elif "downwardAPI" in source:
                        files.update(self.downward_files(source["downwardAPI"], mode))
            else:
                raise rules.ConfigError(f"volume {name}: this local node has no {sorted(set(vol) - {'name'})}")
            path.mkdir(parents=True, exist_ok=True)
            for rel, (data, fmode) in files.items():
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                target.chmod(fmode)
                if fs_group is not None:
                    os.chown(target, -1, int(fs_group))
            self.mounts[name] = path

    def object_files(self, vol: dict[str, Any], default_mode: int | None = None) -> dict[str, tuple[bytes, int]]:
        kind = "ConfigMap" if "configMap" in vol else "Secret"
        ref = vol.get("configMap") or vol.get("secret") or {}
        name = ref.get("name") or ref.get("secretName")
        mode = ref.get("defaultMode", default_mode if default_mode is not None else 0o644)
        obj = self.node.find_object(self.ns, kind, name)
        if obj is None:
            if ref.get("optional"):
                return {}
            raise rules.ConfigError(f'{kind.lower()} "{name}" not found')
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        if kind == "Secret":
            data = {k: base64.b64decode(v) for k, v in data.items()}
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        items = ref.get("items")
        if not items:
            return {k: (v, mode) for k, v in data.items()}
        out = {}
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise rules.ConfigError(f"configmap/secret {name} has no key {item['key']}")
            out[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return out

    def downward_files(self, source: dict[str, Any], default_mode: int = 0o644) -> dict[str, tuple[bytes, int]]:
        out = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = rules.field_value(self.pod, item["fieldRef"]["fieldPath"])
            else:
                raise rules.ConfigError(f"downwardAPI item {item.get('path')}: only fieldRef on this node")
            out[item["path"]] = (value.encode(), item.get("mode", default_mode))
        return out

    def token(self, source: dict[str, Any]) -> bytes:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {"expirationSeconds": int(source.get("expirationSeconds", 3600)),
                                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.pod_name,
                                                   "uid": self.uid}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        try:
            got = self.node.kube.create(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token",
                                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                         "spec": spec})
        except ApiError as exc:
            raise rules.ConfigError(f"token for serviceaccount {sa}: {exc.message}") from exc
        return str(got["status"]["token"]).encode()

    # -- containers -----------------------------------------------------------------------------------------

    def start_container(self, c: Container) -> None:
        image = rules.resolve_image(c.spec.get("image", ""), self.node.images)
        if image is None:  # never resolves: back and forth, as a kubelet reports a pull that keeps failing
            reason = "ImagePullBackOff" if (c.state.get("waiting") or {}).get("reason") == "ErrImagePull" \
                else "ErrImagePull"
            msg = f'Failed to pull image "{c.spec.get("image")}": not in this local node\'s image map'
            if c.state.get("waiting", {}).get("reason") != reason:
                self.event("Failed", msg, "Warning")
            c.state = {"waiting": {"reason": reason, "message": msg}}
            c.next_start = time.monotonic() + 2
            return
        try:
            # The downward API sees this node's own view of the pod (its IP before the watch shows it).
            status = {**(self.pod.get("status") or {}), "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                      "hostIP": self.node.network.gateway}
            pod = {**self.pod, "status": status}
            env = rules.container_env(pod, c.spec, image, self.node.base_env(pod), self.node.env_objects(self.ns))
            command = rules.container_command(c.spec, image, env)
            uid, gid, groups = rules.container_user(self.pod, c.spec, image)
        except rules.ConfigError as exc:
            if c.state.get("waiting", {}).get("message") != str(exc):
                self.event("Failed", f"Error: {exc}", "Warning")
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 1
            return
        c.dir.mkdir(parents=True, exist_ok=True)
        tlog = c.dir / "termination-log"
        tlog.write_bytes(b"")
        tlog.chmod(0o666)
        for leftover in ("pid", "start-error"):
            (c.dir / leftover).unlink(missing_ok=True)
        # The image's /etc/passwd and /etc/group (the node's own plus what its Dockerfile's `useradd` made), and
        # HOME from them where neither the image nor the pod sets it, as container runtimes do.
        passwd = rules.image_passwd(image, Path("/etc/passwd").read_text())
        (c.dir / "passwd").write_text(passwd)
        (c.dir / "group").write_text(rules.image_group(image, Path("/etc/group").read_text()))
        env.setdefault("HOME", rules.home_directory(uid, passwd))
        mounts = [{"source": str(c.dir / name), "target": f"/etc/{name}", "readOnly": True}
                  for name in ("passwd", "group")]
        volume_names = {v["name"] for v in self.pod["spec"].get("volumes") or []}
        for m in c.spec.get("volumeMounts") or []:
            if m["name"] not in volume_names or m["name"] not in self.mounts:
                continue
            source = self.mounts[m["name"]]
            if m.get("subPath"):
                source = source / m["subPath"]
                if not source.exists():  # a missing subPath is made (an existing one may be a file)
                    source.mkdir(parents=True)
            mounts.append({"source": str(source), "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
        sc = c.spec.get("securityContext") or {}
        rootfs = c.dir / "rootfs"
        rootfs.mkdir(exist_ok=True)
        spec = {"netns": f"/run/netns/{self.netns}", "rootfs": str(rootfs), "tmp": str(self.dir / "tmp"),
                "hosts": str(self.hosts), "hostname_file": str(self.dir / "hostname"),
                "hostname": (self.pod["spec"].get("hostname") or self.pod_name)[:63],
                "termination_log": str(tlog), "termination_path": c.spec.get("terminationMessagePath"),
                "mounts": mounts, "env": env, "command": command, "cwd": c.spec.get("workingDir") or image.workdir,
                "uid": uid, "gid": gid, "groups": groups, "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
                "pid_file": str(c.dir / "pid"), "start_error_file": str(c.dir / "start-error"),
                "expose": image.expose}
        (c.dir / "spec.json").write_text(json.dumps(spec))
        logfile = open(c.log_path(), "ab")  # noqa: SIM115 (the child keeps it)
        c.proc = subprocess.Popen([sys.executable, str(SHIM), str(c.dir / "spec.json")], stdout=logfile,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        logfile.close()
        deadline = time.monotonic() + 10
        while not (c.dir / "pid").exists() and c.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        c.pid1 = int((c.dir / "pid").read_text()) if (c.dir / "pid").exists() else None
        c.started_at = rules.now_iso()
        c.state = {"running": {"startedAt": c.started_at}}
        c.ready = False
        c.oom = c.killed_by_liveness = False
        c.probes = {}
        self.event("Started", f"Started container {c.name}")

    def reap(self, c: Container) -> bool:
        """Record an exit; True when the container has ended."""
        if c.proc is None or c.proc.poll() is None:
            return False
        code = c.proc.returncode
        start_error = c.dir / "start-error"
        finished = rules.now_iso()
        message = start_error.read_text() if start_error.exists() else ""
        if message:
            terminated = {"exitCode": 128, "reason": "StartError", "message": message}
        else:
            written = (c.dir / "termination-log").read_bytes() if (c.dir / "termination-log").exists() else b""
            tail = c.log_path().read_bytes()[-65536:] if c.log_path().exists() else b""
            policy = c.spec.get("terminationMessagePolicy") or "File"
            terminated = {"exitCode": code, "reason": rules.terminated_reason(code, c.oom)}
            message = rules.termination_message(written, tail, policy, code)
            if message:
                terminated["message"] = message
        terminated.update({"startedAt": c.started_at, "finishedAt": finished, "containerID": f"local://{c.pid1}"})
        c.state = {"terminated": terminated}
        c.ready = False
        c.proc = None
        return True

    def stop_containers(self, grace: float, which: list[Container] | None = None, reap: bool = True) -> None:
        """SIGTERM to each PID 1, SIGKILL after `grace` seconds (`reap`: record the exits here, else the
        pod's loop does, and restarts them as the restart policy says)."""
        targets = [c for c in (which or self.inits + self.containers) if c.running()]
        for c in targets:
            self.event("Killing", f"Stopping container {c.name}")
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.running() for c in targets) and time.monotonic() < deadline and not self.node.stopping.is_set():
            time.sleep(0.05)
        for c in targets:
            if c.running():
                c.signal(signal.SIGKILL)
            if c.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=30)
            if reap:
                self.reap(c)

    def probe(self, c: Container, kind: str) -> bool | None:
        """Run the container's `kind` probe if it is due; its result, or None when not run or when neither
        successThreshold successes nor failureThreshold failures have been counted yet (as the kubelet, a
        liveness probe that fails once before its first success does not kill the container)."""
        spec = c.spec.get(kind)
        if not spec or c.started_at is None:
            return None
        state = c.probes.setdefault(kind, {"next": time.monotonic() + spec.get("initialDelaySeconds", 0),
                                           "ok": 0, "fail": 0, "result": None})
        if time.monotonic() < state["next"]:
            return None
        state["next"] = time.monotonic() + spec.get("periodSeconds", 10)
        ok = self.node.run_probe(self, c, spec)
        state["ok"], state["fail"] = (state["ok"] + 1, 0) if ok else (0, state["fail"] + 1)
        if ok and state["ok"] >= spec.get("successThreshold", 1):
            state["result"] = True
        elif not ok and state["fail"] >= spec.get("failureThreshold", 3):
            if state["result"] is not False or kind == "livenessProbe":
                self.event("Unhealthy", f"{kind.replace('Probe', '').title()} probe failed", "Warning")
            state["result"] = False
        result: bool | None = state["result"]
        return result

    def run_containers(self) -> None:
        """Init containers in order, then the others, until they are done or the pod is deleted."""
        while not self.initialized and not self.init_failed:
            c = next(x for x in self.inits if "terminated" not in x.state or x.state["terminated"]["exitCode"] != 0)
            if not self.wait_start(c):
                return
            while c.running() and not self.stopping():
                self.report()
                self.changed.wait(0.1)
                self.changed.clear()
            if self.stopping():
                return
            self.reap(c)
            code = c.state["terminated"]["exitCode"]
            if code != 0:
                if self.restart_policy == "Never":
                    self.init_failed = True
                else:
                    self.back_off(c)
            elif all("terminated" in x.state and x.state["terminated"]["exitCode"] == 0 for x in self.inits):
                self.initialized = True
            self.report()
        if self.init_failed:
            return
        while not self.stopping():
            for c in self.containers:
                if c.proc is None and "terminated" not in c.state and "running" not in c.state:
                    if time.monotonic() >= c.next_start:
                        self.start_container(c)
                elif c.running():
                    ready = self.probe(c, "readinessProbe")
                    c.ready = ready if ready is not None else (c.ready or "readinessProbe" not in c.spec)
                    alive = self.probe(c, "livenessProbe")
                    if alive is False and not c.killed_by_liveness:
                        c.killed_by_liveness = True
                        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                        threading.Thread(target=self.stop_containers, args=(grace, [c], False), daemon=True).start()
                elif c.proc is not None and self.reap(c):
                    if rules.will_restart(self.restart_policy, c.state["terminated"]["exitCode"]):
                        self.back_off(c)
                elif "waiting" in c.state and c.state["waiting"].get("reason") == "CrashLoopBackOff" \
                        and time.monotonic() >= c.next_start:
                    self.start_container(c)
            self.report()
            if all("terminated" in c.state and not rules.will_restart(self.restart_policy,
                                                                     c.state["terminated"]["exitCode"])
                   for c in self.containers):
                # Done: wait for the deletion (the pod stays, as on a real node).
                while not self.stopping():
                    self.changed.wait(1)
                    self.changed.clear()
                return
            self.changed.wait(0.1)
            self.changed.clear()

    def wait_start(self, c: Container) -> bool:
        while not self.stopping():
            if time.monotonic() >= c.next_start:
                self.start_container(c)
                if c.proc is not None:
                    return True
            self.report()
            self.changed.wait(0.2)
            self.changed.clear()
        return False

    def back_off(self, c: Container) -> None:
        """The kubelet's restart back-off: 10 s doubling to 300 s (the node's --backoff scales it)."""
        c.last_state = c.state
        c.restarts += 1
        c.backoff = min(max(c.backoff * 2, self.node.backoff), 300.0)
        c.next_start = time.monotonic() + c.backoff
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {c.backoff:g}s restarting failed container={c.name} "
                                          f"pod={self.pod_name}_{self.ns}({self.uid})"}}
        self.event("BackOff", f"Back-off restarting failed container {c.name}", "Warning")

    def stopping(self) -> bool:
        return self.deleting or self.gone or self.lost or self.node.stopping.is_set()

    # -- the whole life ---------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.setup_sandbox()
            self.report()
            while not self.stopping():
                try:
                    self.prepare_volumes()
                    break
                except rules.ConfigError as exc:
                    self.event("FailedMount", str(exc), "Warning")
                    self.report()
                    self.changed.wait(1)
                    self.changed.clear()
            if not self.stopping():
                self.run_containers()
            if self.lost:
                for c in self.inits + self.containers:
                    c.signal(signal.SIGKILL)
                return
            if self.node.stopping.is_set():
                self.stop_containers(0)
                return
            grace = float(self.pod["metadata"].get("deletionGracePeriodSeconds") or 0)
            if self.gone:
                grace = max(grace, MIN_KILL_GRACE)
            self.stop_containers(grace)
            self.report()
            if not self.gone:
                self.node.final_delete(self.ns, self.pod_name, self.uid)
        except Exception:
            log.exception("%s failed", self.name)
        finally:
            self.teardown()

    def teardown(self) -> None:
        for c in self.inits + self.containers:
            if c.running():
                c.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=10)  # type: ignore[union-attr]
        for path in self.tmpfs:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.node.network.delete_pod_netns(self.netns)
        if self.ip:
            self.node.network.release(self.ip)
        self.node.forget(self)


# --- the node -----------------------------------------------------------------------------------------------


class NodeAgent:
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

    def run_probe(self, worker: PodWorker, c: Container, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec or "tcpSocket" in spec:
                action = spec.get("httpGet") or spec.get("tcpSocket") or {}
                port = action["port"]
                if not isinstance(port, int) and not str(port).isdigit():
                    port = next(p["containerPort"] for p in c.spec.get("ports") or [] if p.get("name") == port)
                host = action.get("host") or worker.ip
                if "tcpSocket" in spec:
                    import socket

                    with socket.create_connection((host, int(port)), timeout=timeout):
                        return True
                scheme = str(action.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{host}:{port}{action.get('path', '/')}"
                resp = requests.get(url, timeout=timeout, verify=False, allow_redirects=False,
                                    headers={h["name"]: h["value"] for h in action.get("httpHeaders") or []})
                return 200 <= resp.status_code < 400
            if "exec" in spec and c.pid1:
                result = subprocess.run(["nsenter", "-t", str(c.pid1), "-a", *spec["exec"]["command"]],
                                        capture_output=True, timeout=timeout)
                return result.returncode == 0
        except (OSError, requests.RequestException, StopIteration, subprocess.TimeoutExpired):
            return False
        return False

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

    def serve_control(self) -> ThreadingHTTPServer:
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.reply(200, node.describe() if self.path == "/pods" else {"name": node.name})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                try:
                    if self.path == "/lose":
                        node.lose()
                        return self.reply(200, {"lost": node.name})
                    c = node.find_container(body["namespace"], body["pod"], body.get("container"))
                    if self.path == "/oom":
                        c.oom = True
                        c.signal(signal.SIGKILL)
                    elif self.path == "/kill":
                        c.signal(int(body.get("signal", signal.SIGKILL)))
                    else:
                        return self.reply(404, {"error": self.path})
                    self.reply(200, {"pid": c.pid1})
                except KeyError as exc:
                    self.reply(404, {"error": str(exc)})

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True, name="control").start()
        (self.state / "control-port.tmp").write_text(str(server.server_address[1]))
        (self.state / "control-port.tmp").rename(self.state / "control-port")
        return server

    def run(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.register()
        for r in (self.services, self.slices):
            r.start()
        for r in (self.services, self.slices):
            r.synced.wait(30)
        threading.Thread(target=self.heartbeat, daemon=True, name="heartbeat").start()
        self.pods.start()
        server = self.serve_control()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.node")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--network", required=True, help="the Network as JSON (netns.Network.to_json)")
    parser.add_argument("--state", required=True)
    parser.add_argument("--images", required=True, help="a JSON file: image or repository → kubelet_rules.Image")
    parser.add_argument("--backoff", type=float, default=10.0, help="the first restart back-off, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    import urllib3

    urllib3.disable_warnings()  # probes of https endpoints do not verify, as the kubelet's do not
    agent = NodeAgent(Kube(args.kubeconfig), args.name, args.index, Network.from_json(args.network), Path(args.state),
                      json.loads(Path(args.images).read_text()), backoff=args.backoff)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    agent.run()
    return 0


# --- the test side --------------------------------------------------------------------------------------------


class LocalNode:
    """A running `cluster.node` process, from the tests: start, fault injection, logs, stop."""

    def __init__(self, control_plane_kubeconfig: Path, name: str, index: int, network: Network, state: Path,
                 images: dict[str, rules.Image], backoff: float = 10.0):
        self.name, self.state, self.network = name, state, network
        state.mkdir(parents=True, exist_ok=True)
        (state / "images.json").write_text(json.dumps({k: v.to_json() for k, v in images.items()}))
        self.log = open(state / "node.log", "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.node", "--kubeconfig", str(control_plane_kubeconfig), "--name", name,
             "--index", str(index), "--network", network.to_json(), "--state", str(state),
             "--images", str(state / "images.json"), "--backoff", str(backoff)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_term_with_parent)
        deadline = time.monotonic() + 60
        while not (state / "control-port").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"local node {name} did not start:\n{self.read_log()[-3000:]}")
            time.sleep(0.05)
        self.port = int((state / "control-port").read_text())

    def read_log(self) -> str:
        return (self.state / "node.log").read_text(errors="replace")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = requests.request(method, f"http://127.0.0.1:{self.port}{path}", json=body, timeout=30)
        if resp.status_code >= 300:
            raise KeyError(resp.text)
        return resp.json()

    def pods(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/pods"))

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next((p for p in self.pods() if p["namespace"] == namespace and p["name"] == name), None)

    def kill(self, namespace: str, pod: str, container: str | None = None, sig: int = signal.SIGKILL) -> int:
        return int(self._call("POST", "/kill", {"namespace": namespace, "pod": pod, "container": container,
                                                "signal": int(sig)})["pid"])

    def oom(self, namespace: str, pod: str, container: str | None = None) -> None:
        self._call("POST", "/oom", {"namespace": namespace, "pod": pod, "container": container})

    def lose(self) -> None:
        self._call("POST", "/lose")

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """Every run's output of a container of a pod that ran here (current or gone), oldest first."""
        out = []
        for d in sorted((self.state / "pods").glob(f"{namespace}_{pod}_*")):
            for cdir in sorted(d.glob("[ci]/*")):
                if container in (None, cdir.name):
                    for f in sorted(cdir.glob("*.log"), key=lambda p: int(p.stem)):
                        out.append(f.read_text(errors="replace"))
        return "".join(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        # A node killed hard leaves Memory volumes mounted: unmount anything under its state.
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1] for line in f]
        for m in sorted((m for m in mounted if m.startswith(str(self.state))), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)


def _term_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the node stops with the test run


if __name__ == "__main__":
    sys.exit(main())
