"""The cluster under test (a given one, or a control plane started here), the address the bench's pods
get, and the /progress server behind that address."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import yaml

from . import ROOT
from .workload import MAX_STEPS

CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def bench_address() -> Iterator[str | None]:
    """The bench's pods' IP: the host address of a test bridge that the bench makes on this machine (as the
    test bed does; traffic to it never leaves the machine). Not loopback, which EndpointSlices refuse; the
    operator reads /progress from it. None without root: the jobs then have no metrics port."""
    if os.geteuid() != 0:
        yield None
        return
    from cluster.netns import Network

    net = Network.create(None)
    try:
        yield net.gateway
    finally:
        net.destroy()


@contextlib.asynccontextmanager
async def progress_server(ip: str | None) -> AsyncIterator[int]:
    """Every worker's GET /progress, as a training trainer answers it (the step advances at each read);
    yields the port (0 when there is no usable address: the jobs then have no metrics port)."""
    if ip is None:
        yield 0
        return
    from aiohttp import web

    reads = 0

    async def progress(request: web.Request) -> web.Response:
        nonlocal reads
        reads += 1
        now = time.time()
        return web.json_response({"step": reads % MAX_STEPS, "maxSteps": MAX_STEPS, "loss": 3.0 - reads / 1e5,
                                  "tokensPerSecond": 1.0e5, "phase": "training", "updatedAt": now})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/progress", progress)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, ip, port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def control_plane(kubeconfig: str | None) -> Iterator[tuple[Path, dict[str, int], str]]:
    """(kubeconfig, control-plane pids by component, description): the given cluster, or one started here."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        yield path, local_control_plane(path), f"kubeconfig {kubeconfig}"
        return
    from cluster.controlplane import ControlPlane, missing_assets

    why = missing_assets()
    if why:
        raise SystemExit(why)
    state = Path(tempfile.mkdtemp(prefix="kubetrain-bench-k8s-"))
    started = time.perf_counter()
    cp = ControlPlane.start(state)
    try:
        pids = {name: int((state / "run" / f"{name}.pid").read_text()) for name in CONTROL_PLANE
                if (state / "run" / f"{name}.pid").exists()}
        version = _server_version(cp.kubeconfig)
        print(f"control plane {version} up at {cp.server} in {time.perf_counter() - started:.1f} s ({state})",
              file=sys.stderr, flush=True)
        yield cp.kubeconfig, pids, f"own control plane {version} ({cp.server})".replace(" ()", "")
    finally:
        cp.stop(wipe=True)


def _server_version(kubeconfig: Path) -> str:
    """The server's gitVersion, "" when kubectl cannot tell (it only labels the report)."""
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(subprocess.run(
            [str(ROOT / ".tools" / "bin" / "kubectl"), "--kubeconfig", str(kubeconfig), "version", "-o",
             "json"], capture_output=True, text=True, timeout=30).stdout)["serverVersion"]["gitVersion"])
    return ""


def local_control_plane(kubeconfig: Path) -> dict[str, int]:
    """The given cluster's control-plane processes if they run on this machine (for CPU accounting): an up.sh
    state directory's pid files beside the kubeconfig, else the kube-apiserver serving its port and that
    server's etcd. (Other clusters may run here too: nothing is matched by name alone.)"""
    run = kubeconfig.parent / "run"
    pids = {name: int((run / f"{name}.pid").read_text()) for name in CONTROL_PLANE if (run / f"{name}.pid").exists()}
    if pids:
        return pids
    with contextlib.suppress(OSError, ValueError, KeyError, StopIteration, yaml.YAMLError):
        port = _local_port(kubeconfig)
        if port is None:
            return {}
        etcd_port = None
        for proc in psutil.process_iter(["cmdline"]):
            args = proc.info["cmdline"] or []
            if args and Path(args[0]).name == "kube-apiserver" and f"--secure-port={port}" in args:
                pids["kube-apiserver"] = proc.pid
                etcd = next((a for a in args if a.startswith("--etcd-servers=")), "")
                etcd_port = etcd.rsplit(":", 1)[-1].split(",")[0] if etcd else None
        for proc in psutil.process_iter(["cmdline"]):
            args = proc.info["cmdline"] or []
            if etcd_port and args and Path(args[0]).name == "etcd" and any(
                    a.startswith("--listen-client-urls=") and a.endswith(f":{etcd_port}") for a in args):
                pids["etcd"] = proc.pid
    return pids


def _local_port(kubeconfig: Path) -> str | None:
    """The port of the current context's server if that server is on this machine's loopback, else None."""
    config = yaml.safe_load(kubeconfig.read_text())
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    server = next(c["cluster"]["server"] for c in config["clusters"] if c["name"] == context["cluster"])
    host_port = server.split("://", 1)[-1].rstrip("/")
    if host_port.split(":")[0] not in ("127.0.0.1", "localhost"):
        return None
    return host_port.rsplit(":", 1)[1]
