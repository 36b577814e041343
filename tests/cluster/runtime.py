"""The local node's container runtime: one container of a pod (`Container`: its spec, process, state and
probe counters), starting it through the namespace shim (`container.py`) and recording how it ended.

`start_container` goes image → configuration → the container's files → mounts → the shim's spec → the
process, in that order; a step that cannot go on (an image not in the map, a missing reference) leaves
the container waiting with the kubelet's reason and a time for the next try.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kubelet_rules as rules
from .netns import _die_with_parent

if TYPE_CHECKING:
    from .pod_worker import PodWorker

SHIM = Path(__file__).with_name("container.py")


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


# --- starting ---------------------------------------------------------------------------------------------


def start_container(worker: PodWorker, c: Container) -> None:
    """One try at starting `c`: running when it returns, or waiting with a reason and `c.next_start`."""
    image = _image(worker, c)
    if image is None:
        return
    config = _config(worker, c, image)
    if config is None:
        return
    env, command, (uid, gid, groups) = config
    tlog = _prepare_dir(c, image, uid, env)
    mounts = _mounts(worker, c)
    spec = _shim_spec(worker, c, image, tlog, mounts, env, command, (uid, gid, groups))
    _launch(c, spec)
    worker.event("Started", f"Started container {c.name}")


def _image(worker: PodWorker, c: Container) -> rules.Image | None:
    """The image from the node's image map, or None with the container waiting in ErrImagePull."""
    image = rules.resolve_image(c.spec.get("image", ""), worker.node.images)
    if image is None:  # never resolves: back and forth, as a kubelet reports a pull that keeps failing
        reason = "ImagePullBackOff" if (c.state.get("waiting") or {}).get("reason") == "ErrImagePull" \
            else "ErrImagePull"
        msg = f'Failed to pull image "{c.spec.get("image")}": not in this local node\'s image map'
        if c.state.get("waiting", {}).get("reason") != reason:
            worker.event("Failed", msg, "Warning")
        c.state = {"waiting": {"reason": reason, "message": msg}}
        c.next_start = time.monotonic() + 2
    return image


def _config(worker: PodWorker, c: Container, image: rules.Image
            ) -> tuple[dict[str, str], list[str], tuple[int, int, list[int]]] | None:
    """(env, command, (uid, gid, groups)), or None with the container waiting in CreateContainerConfigError."""
    try:
        # The downward API sees this node's own view of the pod (its IP before the watch shows it).
        status = {**(worker.pod.get("status") or {}), "podIP": worker.ip, "podIPs": [{"ip": worker.ip}],
                  "hostIP": worker.node.network.gateway}
        pod = {**worker.pod, "status": status}
        env = rules.container_env(pod, c.spec, image, worker.node.base_env(pod), worker.node.env_objects(worker.ns))
        command = rules.container_command(c.spec, image, env)
        user = rules.container_user(worker.pod, c.spec, image)
    except rules.ConfigError as exc:
        if c.state.get("waiting", {}).get("message") != str(exc):
            worker.event("Failed", f"Error: {exc}", "Warning")
        c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
        c.next_start = time.monotonic() + 1
        return None
    return env, command, user


def _prepare_dir(c: Container, image: rules.Image, uid: int, env: dict[str, str]) -> Path:
    """The container's directory for this run: an empty termination log (returned), no pid or start error
    of the last run, the image's /etc/passwd and /etc/group; sets HOME in `env` where nothing else did."""
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
    return tlog


def _mounts(worker: PodWorker, c: Container) -> list[dict[str, Any]]:
    """The shim's bind mounts: /etc/passwd and /etc/group, then the container's volumeMounts of prepared volumes."""
    mounts = [{"source": str(c.dir / name), "target": f"/etc/{name}", "readOnly": True}
              for name in ("passwd", "group")]
    volume_names = {v["name"] for v in worker.pod["spec"].get("volumes") or []}
    for m in c.spec.get("volumeMounts") or []:
        if m["name"] not in volume_names or m["name"] not in worker.mounts:
            continue
        source = worker.mounts[m["name"]]
        if m.get("subPath"):
            source = source / m["subPath"]
            if not source.exists():  # a missing subPath is made (an existing one may be a file)
                source.mkdir(parents=True)
        mounts.append({"source": str(source), "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
    return mounts


def _shim_spec(worker: PodWorker, c: Container, image: rules.Image, tlog: Path, mounts: list[dict[str, Any]],
               env: dict[str, str], command: list[str], user: tuple[int, int, list[int]]) -> dict[str, Any]:
    """What container.py reads from SPEC.json (see its docstring)."""
    uid, gid, groups = user
    sc = c.spec.get("securityContext") or {}
    rootfs = c.dir / "rootfs"
    rootfs.mkdir(exist_ok=True)
    return {"netns": f"/run/netns/{worker.netns}", "rootfs": str(rootfs), "tmp": str(worker.dir / "tmp"),
            "hosts": str(worker.hosts), "hostname_file": str(worker.dir / "hostname"),
            "hostname": (worker.pod["spec"].get("hostname") or worker.pod_name)[:63],
            "termination_log": str(tlog), "termination_path": c.spec.get("terminationMessagePath"),
            "mounts": mounts, "env": env, "command": command, "cwd": c.spec.get("workingDir") or image.workdir,
            "uid": uid, "gid": gid, "groups": groups, "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
            "pid_file": str(c.dir / "pid"), "start_error_file": str(c.dir / "start-error"),
            "expose": image.expose}


def _launch(c: Container, spec: dict[str, Any]) -> None:
    """Start the shim, wait (10 s at most) for PID 1's host pid, and mark the container running."""
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


# --- ending -----------------------------------------------------------------------------------------------


def reap(c: Container) -> bool:
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
