"""One pod on the local node, from admission to its final delete: a `PodWorker` thread per pod.

Its life (`PodWorker.run`): the sandbox (network namespace, pod IP, /etc/hosts, /etc/hostname), the
volumes (volumes.py; retried with FailedMount while a source is missing), the init containers in order,
then the others — started (runtime.py), probed (probes.py), restarted with the kubelet's back-off as the
restart policy says — and on deletion SIGTERM, SIGKILL after the grace period, the terminal status and
the final delete. Status goes to the API whenever it changes (`report`). A lost node's workers kill
their containers and say nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from . import kubelet_rules as rules
from . import runtime
from .client import ApiError
from .probes import probe
from .runtime import Container
from .volumes import prepare_volumes

if TYPE_CHECKING:
    from .agent import NodeAgent

log = logging.getLogger("local-node")
MIN_KILL_GRACE = 2  # a pod force-deleted from the API still gets SIGTERM and this long (as the kubelet)


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
        """Patch the pod's status when it differs from what was last sent (a 404: the pod is gone)."""
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

    def stopping(self) -> bool:
        return self.deleting or self.gone or self.lost or self.node.stopping.is_set()

    # -- the sandbox --------------------------------------------------------------------------------------

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
        """The pod's /etc/hosts from the node's Services and EndpointSlices (called again as they change)."""
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

    # -- containers ---------------------------------------------------------------------------------------

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
                runtime.reap(c)

    def run_containers(self) -> None:
        """Init containers in order, then the others, until they are done or the pod is deleted."""
        if self.run_init_containers():
            self.run_app_containers()

    def run_init_containers(self) -> bool:
        """Each init container to success (restarted with back-off unless the policy is Never); False when
        the pod stops first or an init container failed for good."""
        while not self.initialized and not self.init_failed:
            c = next(x for x in self.inits if "terminated" not in x.state or x.state["terminated"]["exitCode"] != 0)
            if not self.wait_start(c):
                return False
            while c.running() and not self.stopping():
                self.report()
                self.changed.wait(0.1)
                self.changed.clear()
            if self.stopping():
                return False
            runtime.reap(c)
            code = c.state["terminated"]["exitCode"]
            if code != 0:
                if self.restart_policy == "Never":
                    self.init_failed = True
                else:
                    self.back_off(c)
            elif all("terminated" in x.state and x.state["terminated"]["exitCode"] == 0 for x in self.inits):
                self.initialized = True
            self.report()
        return not self.init_failed

    def run_app_containers(self) -> None:
        """Tick every 0.1 s (or on a change): each container one step on; done when none will restart."""
        while not self.stopping():
            for c in self.containers:
                self.tick(c)
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

    def tick(self, c: Container) -> None:
        """One step of one container: start it when due, probe it while it runs, reap and back off when it ends."""
        if c.proc is None and "terminated" not in c.state and "running" not in c.state:
            if time.monotonic() >= c.next_start:
                runtime.start_container(self, c)
        elif c.running():
            ready = probe(self, c, "readinessProbe")
            c.ready = ready if ready is not None else (c.ready or "readinessProbe" not in c.spec)
            alive = probe(self, c, "livenessProbe")
            if alive is False and not c.killed_by_liveness:
                c.killed_by_liveness = True
                grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                # In the background: the loop keeps reporting and probing the others meanwhile.
                threading.Thread(target=self.stop_containers, args=(grace, [c], False), daemon=True).start()
        elif c.proc is not None and runtime.reap(c):
            if rules.will_restart(self.restart_policy, c.state["terminated"]["exitCode"]):
                self.back_off(c)
        elif "waiting" in c.state and c.state["waiting"].get("reason") == "CrashLoopBackOff" \
                and time.monotonic() >= c.next_start:
            runtime.start_container(self, c)

    def wait_start(self, c: Container) -> bool:
        while not self.stopping():
            if time.monotonic() >= c.next_start:
                runtime.start_container(self, c)
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

    # -- the whole life -----------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.setup_sandbox()
            self.report()
            while not self.stopping():
                try:
                    prepare_volumes(self)
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

