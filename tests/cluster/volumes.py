"""A pod's volumes as host directories, made before its containers start: hostPath (the host's own),
emptyDir (`medium: Memory` is a tmpfs), and the file-backed ones — configMap, secret, downwardAPI and
projected (ServiceAccount tokens from the TokenRequest API bound to the pod, configMaps, secrets,
downwardAPI) — written out with their modes and the pod's fsGroup. The container shim bind-mounts them.

A source that is missing raises `rules.ConfigError`; the pod worker reports FailedMount and tries again.
"""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kubelet_rules as rules
from .client import ApiError

if TYPE_CHECKING:
    from .pod_worker import PodWorker

Files = dict[str, tuple[bytes, int]]  # path in the volume → (content, mode)


def prepare_volumes(worker: PodWorker) -> None:
    """Every volume as a host directory in `worker.mounts` (those already there are kept: this is retried)."""
    spec = worker.pod["spec"]
    fs_group = (spec.get("securityContext") or {}).get("fsGroup")
    for vol in spec.get("volumes") or []:
        name = vol["name"]
        if name in worker.mounts:
            continue
        path = worker.dir / "volumes" / name
        if "hostPath" in vol:
            worker.mounts[name] = _host_path(vol["hostPath"])
        elif "emptyDir" in vol:
            worker.mounts[name] = _empty_dir(worker, vol["emptyDir"], path)
        else:
            _write_files(path, _volume_files(worker, vol), fs_group)
            worker.mounts[name] = path


def _host_path(source: dict[str, Any]) -> Path:
    host = Path(source["path"])
    if source.get("type") in ("DirectoryOrCreate",):
        host.mkdir(parents=True, exist_ok=True)
    if not host.exists():
        raise rules.ConfigError(f"hostPath {host} does not exist")
    return host


def _empty_dir(worker: PodWorker, source: dict[str, Any] | None, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if (source or {}).get("medium") == "Memory":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(path)], check=True)
        worker.tmpfs.append(path)  # unmounted when the pod is torn down
    path.chmod(0o777)
    return path


def _volume_files(worker: PodWorker, vol: dict[str, Any]) -> Files:
    if "configMap" in vol or "secret" in vol:
        return object_files(worker, vol)
    if "downwardAPI" in vol:
        return downward_files(worker, vol["downwardAPI"])
    if "projected" in vol:
        return _projected_files(worker, vol["projected"])
    raise rules.ConfigError(f"volume {vol['name']}: this local node has no {sorted(set(vol) - {'name'})}")


def _projected_files(worker: PodWorker, projected: dict[str, Any]) -> Files:
    files: Files = {}
    mode = projected.get("defaultMode", 0o644)
    for source in projected.get("sources") or []:
        if "serviceAccountToken" in source:
            files[source["serviceAccountToken"]["path"]] = (token(worker, source["serviceAccountToken"]), mode)
        elif "configMap" in source or "secret" in source:
            files.update(object_files(worker, source, mode))
        elif "downwardAPI" in source:
            files.update(downward_files(worker, source["downwardAPI"], mode))
    return files


def _write_files(path: Path, files: Files, fs_group: Any) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for rel, (data, fmode) in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(fmode)
        if fs_group is not None:
            os.chown(target, -1, int(fs_group))


def object_files(worker: PodWorker, vol: dict[str, Any], default_mode: int | None = None) -> Files:
    """A configMap or secret volume (or projected source): every key, or the `items` asked for."""
    kind = "ConfigMap" if "configMap" in vol else "Secret"
    ref = vol.get("configMap") or vol.get("secret") or {}
    name = ref.get("name") or ref.get("secretName")
    mode = ref.get("defaultMode", default_mode if default_mode is not None else 0o644)
    obj = worker.node.find_object(worker.ns, kind, name)
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


def downward_files(worker: PodWorker, source: dict[str, Any], default_mode: int = 0o644) -> Files:
    out = {}
    for item in source.get("items") or []:
        if "fieldRef" in item:
            value = rules.field_value(worker.pod, item["fieldRef"]["fieldPath"])
        else:
            raise rules.ConfigError(f"downwardAPI item {item.get('path')}: only fieldRef on this node")
        out[item["path"]] = (value.encode(), item.get("mode", default_mode))
    return out


def token(worker: PodWorker, source: dict[str, Any]) -> bytes:
    """A ServiceAccount token bound to the pod, from the TokenRequest API (as the kubelet gets it)."""
    sa = worker.pod["spec"].get("serviceAccountName") or "default"
    spec: dict[str, Any] = {"expirationSeconds": int(source.get("expirationSeconds", 3600)),
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": worker.pod_name,
                                               "uid": worker.uid}}
    if source.get("audience"):
        spec["audiences"] = [source["audience"]]
    try:
        got = worker.node.kube.create(f"/api/v1/namespaces/{worker.ns}/serviceaccounts/{sa}/token",
                                      {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                       "spec": spec})
    except ApiError as exc:
        raise rules.ConfigError(f"token for serviceaccount {sa}: {exc.message}") from exc
    return str(got["status"]["token"]).encode()
