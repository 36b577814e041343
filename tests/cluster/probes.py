"""Readiness and liveness probes as the kubelet runs them: when one is due (initialDelaySeconds,
periodSeconds), what counts as a result (successThreshold, failureThreshold), and the probe itself —
httpGet and tcpSocket from the node to the pod's IP (the node is on the pod's bridge), exec inside the
container's namespaces with nsenter."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from .pod_worker import PodWorker
    from .runtime import Container


def probe(worker: PodWorker, c: Container, kind: str) -> bool | None:
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
    ok = run_probe(worker, c, spec)
    state["ok"], state["fail"] = (state["ok"] + 1, 0) if ok else (0, state["fail"] + 1)
    if ok and state["ok"] >= spec.get("successThreshold", 1):
        state["result"] = True
    elif not ok and state["fail"] >= spec.get("failureThreshold", 3):
        if state["result"] is not False or kind == "livenessProbe":
            worker.event("Unhealthy", f"{kind.replace('Probe', '').title()} probe failed", "Warning")
        state["result"] = False
    result: bool | None = state["result"]
    return result


def run_probe(worker: PodWorker, c: Container, spec: dict[str, Any]) -> bool:
    """One probe: True on success; any error (refused, timed out, a named port the container lacks) fails it."""
    timeout = float(spec.get("timeoutSeconds", 1))
    try:
        if "httpGet" in spec or "tcpSocket" in spec:
            action = spec.get("httpGet") or spec.get("tcpSocket") or {}
            port = action["port"]
            if not isinstance(port, int) and not str(port).isdigit():
                port = next(p["containerPort"] for p in c.spec.get("ports") or [] if p.get("name") == port)
            host = action.get("host") or worker.ip
            if "tcpSocket" in spec:
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
