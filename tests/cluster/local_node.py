"""The test side of a local node: `LocalNode` starts `python -m cluster.node` (with PYTHONPATH=tests),
waits for its control API, and offers what the tests need of it — fault injection (`kill`, `oom`,
`lose`), what runs there (`pods`, `pod`), every run's logs (there is no kubelet API, so `kubectl logs`
does not work), and `stop`, which also unmounts what a node killed hard left mounted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from . import kubelet_rules as rules
from .netns import Network


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

    def logs(self, namespace: str, pod: str, container: str | None = None, uid: str | None = None) -> str:
        """Every run's output of a container of the pods of that name that ran here (current or gone; with
        `uid`, of that pod only), each pod's oldest first."""
        out = []
        for d in sorted((self.state / "pods").glob(f"{namespace}_{pod}_{uid or '*'}")):
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
