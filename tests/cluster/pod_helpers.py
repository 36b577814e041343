"""What the local node's tests (test_node_*.py beside this) share: a pod manifest of the trainer image, and
creating, reading and waiting for pods on the real control plane."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

from support import wait_for

from cluster.client import Kube

IMAGE = "kubetrain/trainer:test"  # the node's image map: this checkout's .venv
PY = "python"


def pod_manifest(name: str, command: list[str], restart: str = "Never", grace: int = 5,
                 **container: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": grace,
                     "containers": [{"name": "main", "image": IMAGE, "command": command, **container}]}}


def create(kube: Kube, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    return dict(kube.create(f"/api/v1/namespaces/{ns}/pods", body))


def get(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    return kube.find(f"/api/v1/namespaces/{ns}/pods/{name}")  # type: ignore[no-any-return]


def wait_phase(kube: Kube, ns: str, name: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
    """The pod once its phase is one of `phases`; on a timeout the error shows where it was (node, status,
    the namespace's events), which is what a failure under load needs to be understood."""
    try:
        return wait_for(lambda: (p := get(kube, ns, name)) and p["status"].get("phase") in phases and p,  # type: ignore[no-any-return]
                        timeout=timeout, what=f"pod {name} {phases}")
    except AssertionError as exc:
        pod = get(kube, ns, name) or {}
        events = kube.get(f"/api/v1/namespaces/{ns}/events").get("items", [])
        seen = [f"{e.get('reason')}: {e.get('message')}" for e in events
                if (e.get("involvedObject") or {}).get("name") == name]
        raise AssertionError(f"{exc}; node {pod.get('spec', {}).get('nodeName')}, status "
                             f"{json.dumps(pod.get('status'))[:3000]}, events {seen[-10:]}") from None


def container_state(pod: dict[str, Any], name: str = "main") -> dict[str, Any]:
    statuses = pod["status"].get("containerStatuses", []) + pod["status"].get("initContainerStatuses", [])
    return next((c for c in statuses if c["name"] == name), {"state": {}})  # type: ignore[no-any-return]


def condition(pod: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in pod["status"].get("conditions") or [] if c["type"] == kind), None)


def python(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):  # reading /proc of a process that is exiting fails: ESRCH
        return False
    return not stat.split(") ")[-1].startswith("Z")
