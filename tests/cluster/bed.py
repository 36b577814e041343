"""The whole test bed for tests: the control plane, the bridge network and the local nodes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from .client import Kube
from .controlplane import ROOT, ControlPlane
from .images import Image, image_from_dockerfile
from .netns import Network
from .node import LocalNode

VENV = ROOT / ".venv"
# The images the local nodes can "pull": this checkout's venv behind each Dockerfile's ENV/USER/ENTRYPOINT.
# One CPU thread per trainer process: the machine has two cores.
TRAINER_ENV = {"OMP_NUM_THREADS": "1", "KUBETRAIN_TEST_BED": "1"}


def images() -> dict[str, Image]:
    trainer = image_from_dockerfile(ROOT / "trainer" / "Dockerfile", VENV, TRAINER_ENV)
    operator = image_from_dockerfile(ROOT / "operator" / "Dockerfile", VENV)
    return {"ghcr.io/kubetrain/trainer": trainer, "kubetrain/trainer": trainer,
            "ghcr.io/kubetrain/operator": operator, "kubetrain/operator": operator}


@dataclass
class LocalCluster:
    control_plane: ControlPlane
    network: Network
    nodes: list[LocalNode] = field(default_factory=list)

    @classmethod
    def start(cls, control_plane: ControlPlane, state: Path, names: tuple[str, ...] = ("node-a", "node-b"),
              backoff: float = 10.0) -> LocalCluster:
        network = Network.create(control_plane.port)
        bed = cls(control_plane, network)
        try:
            for i, name in enumerate(names):
                bed.nodes.append(LocalNode(control_plane.kubeconfig, name, i, network, state / name, images(),
                                           backoff=backoff))
        except Exception:
            bed.stop()
            raise
        return bed

    def node(self, name: str) -> LocalNode:
        return next(n for n in self.nodes if n.name == name)

    def node_of(self, kube: Kube, namespace: str, pod: str) -> LocalNode:
        bound = kube.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["spec"].get("nodeName")
        return self.node(bound)

    def stop(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop()
        self.network.destroy()
