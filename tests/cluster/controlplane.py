"""A real Kubernetes control plane for tests: kube-apiserver, etcd, kube-controller-manager and
kube-scheduler started by `up.sh` from the assets folder (by default `../shared/k8s/` beside the
checkout), the idea of controller-runtime's envtest.

    KUBETRAIN_K8S_ASSETS=/path/to/k8s   # a folder with up.sh and down.sh (and bin/)

Where the assets are absent the tests that need them skip, unless CI=true, where that fails the run.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS_ENV = "KUBETRAIN_K8S_ASSETS"
HOW_TO_GET = (f"set {ASSETS_ENV} to a folder with up.sh/down.sh and the kube-apiserver, kube-controller-manager "
              "and kube-scheduler binaries (this project's machines have it at ../shared/k8s beside the checkout; "
              "elsewhere controller-runtime's `setup-envtest use` fetches kube-apiserver and etcd)")


def assets_dir() -> Path:
    return Path(os.environ.get(ASSETS_ENV) or ROOT.parent / "shared" / "k8s")


def missing_assets() -> str | None:
    """Why the control plane cannot start here, or None."""
    d = assets_dir()
    for name in ("up.sh", "down.sh", "bin/SHA256SUMS"):
        if not (d / name).exists():
            return f"no Kubernetes control plane: {d / name} is missing; {HOW_TO_GET}"
    return None


@dataclass
class ControlPlane:
    """One running instance; `server` is https://127.0.0.1:PORT."""

    state: Path
    kubeconfig: Path
    server: str

    @classmethod
    def start(cls, state: Path, timeout: float = 300) -> ControlPlane:
        d = assets_dir()
        result = subprocess.run(["bash", str(d / "up.sh"), str(state)], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"up.sh {state} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        kubeconfig = Path(result.stdout.strip().splitlines()[-1])
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        return cls(state=state, kubeconfig=kubeconfig, server=env["APISERVER"])

    @property
    def port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    def stop(self, wipe: bool = True) -> None:
        args = ["bash", str(assets_dir() / "down.sh"), *(["--wipe"] if wipe else []), str(self.state)]
        subprocess.run(args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
