"""A small synchronous Kubernetes REST client for tests and the local node (requests over TLS with the
kubeconfig's embedded certificates), plus `kubectl` from `.tools/bin`.

It is deliberately thin: paths are the API's own (`/api/v1/namespaces/ml/pods`), bodies are dicts, and
errors are `ApiError` with the server's status, reason and message."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
PATCH_TYPES = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
               "json": "application/json-patch+json"}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class Kube:
    """`Kube(kubeconfig)`: the current context's cluster and user (client certificate or bearer token)."""

    def __init__(self, kubeconfig: Path | str, timeout: float = 30.0):
        self.kubeconfig = Path(kubeconfig)
        config = yaml.safe_load(self.kubeconfig.read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        self.server = cluster["server"].rstrip("/")
        self.timeout = timeout
        self._dir = tempfile.TemporaryDirectory(prefix="kube-client-")
        self._local = threading.local()
        self.verify: str | bool = True
        self.cert: tuple[str, str] | None = None
        self.headers: dict[str, str] = {}
        if "certificate-authority-data" in cluster:
            self.verify = self._secret_file("ca.crt", cluster["certificate-authority-data"])
        elif "certificate-authority" in cluster:
            self.verify = cluster["certificate-authority"]
        if "client-certificate-data" in user:
            self.cert = (self._secret_file("client.crt", user["client-certificate-data"]),
                         self._secret_file("client.key", user["client-key-data"]))
        if "token" in user:
            self.headers["Authorization"] = f"Bearer {user['token']}"

    def _secret_file(self, name: str, data_b64: str) -> str:
        path = Path(self._dir.name) / name
        path.write_bytes(base64.b64decode(data_b64))
        path.chmod(0o600)
        return str(path)

    @property
    def session(self) -> requests.Session:
        """One session per thread (requests' sessions are not thread-safe)."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.verify, s.cert = self.verify, self.cert
            s.headers.update(self.headers)
            s.trust_env = False  # only ever 127.0.0.1: no proxies
            self._local.session = s
        return s

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body)
        resp = self.session.request(method, self.server + path, data=data, params=params,
                                    headers={"Content-Type": content_type}, timeout=timeout or self.timeout)
        if resp.status_code >= 300:
            try:
                err = resp.json()
            except ValueError:
                err = {}
            raise ApiError(resp.status_code, str(err.get("reason") or resp.reason), str(err.get("message") or
                                                                                         resp.text[:500]))
        return resp.json() if resp.content else {}

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def find(self, path: str) -> Any | None:
        """GET, or None on 404."""
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, **params: Any) -> list[dict[str, Any]]:
        return list(self.get(path, **params).get("items") or [])

    def create(self, path: str, body: dict[str, Any], **params: Any) -> Any:
        return self.request("POST", path, body, params=params or None)

    def replace(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, patch_type: str = "merge", **params: Any) -> Any:
        return self.request("PATCH", path, body, params=params or None, content_type=PATCH_TYPES[patch_type])

    def delete(self, path: str, body: dict[str, Any] | None = None, missing_ok: bool = True, **params: Any) -> Any:
        try:
            return self.request("DELETE", path, body, params=params or None)
        except ApiError as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 60,
              **params: Any) -> Iterator[dict[str, Any]]:
        """The events of one watch request (ends after `timeout_seconds` or when the server closes it)."""
        query = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": str(timeout_seconds),
                 "allowWatchBookmarks": "true", **params}
        with self.session.get(self.server + path, params=query, stream=True,
                              timeout=(self.timeout, timeout_seconds + 30)) as resp:
            if resp.status_code >= 300:
                raise ApiError(resp.status_code, resp.reason, resp.text[:500])
            # Each event arrives as one HTTP chunk; iter_lines() would hold a partial read back until
            # more bytes came (the next event), so read chunk by chunk.
            buffer = b""
            for chunk in resp.raw.read_chunked(decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)

    def close(self) -> None:
        self._dir.cleanup()


def ns_path(namespace: str, plural: str, name: str | None = None, group: str = "", version: str = "v1") -> str:
    """`/api/v1/namespaces/NS/PLURAL[/NAME]`, or under `/apis/GROUP/VERSION` for a group."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    return f"{base}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def kubectl(kubeconfig: Path | str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real kubectl (installed by scripts/install-tools.sh) against this cluster."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    result = subprocess.run([str(KUBECTL), *args], input=input, capture_output=True, text=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def wait_port(host: str, port: int, timeout: float = 30) -> None:
    """Until something accepts TCP connections on host:port."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)
