"""What a kubelet decides, as pure functions over API objects: the environment and $(VAR) expansion, the
command, the user and groups, the pod's /etc/hosts from EndpointSlices, container states and the pod's
phase and conditions. What an image is (the image map, /etc/passwd, HOME) is in `images.py`; the pod
worker (`pod_worker.py` and the modules it uses) does the I/O around both."""

from __future__ import annotations

import base64
import datetime as dt
import re
from typing import Any

# The image half of the rules, re-exported: the node and its tests use `rules.Image`, `rules.resolve_image`, ...
from .images import Image as Image
from .images import home_directory as home_directory
from .images import image_from_dockerfile as image_from_dockerfile
from .images import image_group as image_group
from .images import image_passwd as image_passwd
from .images import repository as repository
from .images import resolve_image as resolve_image

CLUSTER_DOMAIN = "cluster.local"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- environment ------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """CreateContainerConfigError: a referenced ConfigMap/Secret/key is missing, or the user is refused."""


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, `$$` is a literal `$`, unknown
    references stay as written."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, value)


def field_value(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
              "spec.serviceAccountName": spec.get("serviceAccountName"), "status.hostIP": status.get("hostIP"),
              "status.podIP": status.get("podIP"),
              "status.podIPs": ",".join(p.get("ip", "") for p in status.get("podIPs") or [])}
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return str(simple[path] or "")


def _lookup(kind: str, name: str, key: str | None, optional: bool, objects: dict[tuple[str, str], Any]) -> Any:
    obj = objects.get((kind, name))
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    data = dict(obj.get("data") or {})
    if kind == "Secret":
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
    if key is None:
        return data
    if key not in data:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {key} in {kind} {obj['metadata']['namespace']}/{name}")
    return data[key]


def container_env(pod: dict[str, Any], container: dict[str, Any], image: Image, base: dict[str, str],
                  objects: dict[tuple[str, str], Any]) -> dict[str, str]:
    """The container's environment: the image's ENV, what Kubernetes adds (`base`: HOSTNAME, the API
    server's service variables), envFrom, then env in order (later entries may use earlier ones)."""
    env = {**image.env, **base}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref in (("ConfigMap", source.get("configMapRef")), ("Secret", source.get("secretRef"))):
            if ref:
                data = _lookup(kind, ref["name"], None, bool(ref.get("optional")), objects) or {}
                env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        value: Any
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = _lookup("Secret", ref["name"], ref["key"], bool(ref.get("optional")), objects)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = _lookup("ConfigMap", ref["name"], ref["key"], bool(ref.get("optional")), objects)
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, res = ref["resource"].partition(".")
            value = str(((container.get("resources") or {}).get(kind) or {}).get(res, "0"))
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = str(value)
    return env


def container_command(container: dict[str, Any], image: Image, env: dict[str, str]) -> list[str]:
    """command replaces ENTRYPOINT (and drops CMD), args replaces CMD; both get $(VAR) expansion."""
    if container.get("command"):
        command, args = list(container["command"]), list(container.get("args") or [])
    else:
        command = list(image.entrypoint)
        args = list(container["args"]) if container.get("args") is not None else list(image.cmd)
    out = [expand(str(a), env) for a in command + args]
    if not out:
        raise ConfigError("no command specified")
    return out


def container_user(pod: dict[str, Any], container: dict[str, Any], image: Image) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups) from the security contexts over the image's USER."""
    pod_sc = pod["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    image_uid, image_gid = 0, None
    if image.user:
        u, _, g = image.user.partition(":")
        if not u.isdigit() or (g and not g.isdigit()):
            raise ConfigError(f"image user {image.user!r} is not numeric (this node has no /etc/passwd of the image)")
        image_uid, image_gid = int(u), int(g) if g else None
    uid = sc.get("runAsUser", pod_sc.get("runAsUser", image_uid))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", image_gid if image_gid is not None else uid))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    groups = [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    return int(uid), int(gid), groups


# --- cluster DNS as /etc/hosts ----------------------------------------------------------------------------


def hosts_file(pod: dict[str, Any], pod_ip: str, api_host: str, slices: list[dict[str, Any]],
               services: dict[tuple[str, str], dict[str, Any]]) -> str:
    """/etc/hosts with what cluster DNS would answer for this pod: itself, the API server
    (kubernetes.default.svc → the forwarder) and every headless Service's ready endpoints —
    `<hostname>.<service>.<ns>.svc[.cluster.local]` and `<service>.<ns>.svc[...]`, with the short forms
    that the pod's search path (`<ns>.svc.cluster.local`) gives in its own namespace. The EndpointSlice
    controller decides readiness (publishNotReadyAddresses marks every endpoint ready)."""
    ns = pod["metadata"]["namespace"]
    spec = pod["spec"]
    hostname = spec.get("hostname") or pod["metadata"]["name"]
    lines = ["# Kubernetes-managed hosts file (local node).", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback"]
    own = [hostname]
    if spec.get("subdomain"):
        fq = f"{hostname}.{spec['subdomain']}.{ns}.svc"
        own = [f"{fq}.{CLUSTER_DOMAIN}", fq, f"{hostname}.{spec['subdomain']}", hostname]
    lines.append(f"{pod_ip}\t{' '.join(own)}")
    api_names = ["kubernetes.default.svc." + CLUSTER_DOMAIN, "kubernetes.default.svc", "kubernetes.default"]
    lines.append(f"{api_host}\t{' '.join(api_names)}" + (" kubernetes" if ns == "default" else ""))
    entries: dict[str, list[str]] = {}
    for s in slices:
        labels = s["metadata"].get("labels") or {}
        svc_name, svc_ns = labels.get("kubernetes.io/service-name"), s["metadata"]["namespace"]
        svc = services.get((svc_ns, svc_name or ""))
        if not svc_name or svc is None or (svc.get("spec") or {}).get("clusterIP") != "None":
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False or not ep.get("addresses"):
                continue
            address = ep["addresses"][0]
            names = [f"{svc_name}.{svc_ns}.svc.{CLUSTER_DOMAIN}", f"{svc_name}.{svc_ns}.svc"]
            if svc_ns == ns:
                names.append(svc_name)
            if ep.get("hostname"):
                fq = f"{ep['hostname']}.{svc_name}.{svc_ns}.svc"
                names = [f"{fq}.{CLUSTER_DOMAIN}", fq, *([f"{ep['hostname']}.{svc_name}"] if svc_ns == ns else []),
                         *names]
            entries.setdefault(address, [])
            entries[address].extend(n for n in names if n not in entries[address])
    for address in sorted(entries):
        lines.append(f"{address}\t{' '.join(entries[address])}")
    return "\n".join(lines) + "\n"


# --- states, phase, conditions ----------------------------------------------------------------------------


def will_restart(restart_policy: str, exit_code: int) -> bool:
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def pod_phase(restart_policy: str, init_failed: bool, initialized: bool,
              containers: list[dict[str, Any]]) -> str:
    """From the container statuses as the kubelet computes it (a pod that is being deleted ends
    Succeeded or Failed by its containers' exit codes)."""
    if init_failed:
        return "Failed"
    if not initialized:
        return "Pending"
    states = [c.get("state") or {} for c in containers]
    if any("running" in s for s in states):
        return "Running"
    if states and all("terminated" in s for s in states):
        codes = [s["terminated"].get("exitCode", 0) for s in states]
        if any(will_restart(restart_policy, c) for c in codes):
            return "Running"
        return "Succeeded" if all(c == 0 for c in codes) else "Failed"
    if any((s.get("waiting") or {}).get("reason") == "CrashLoopBackOff" for s in states):
        return "Running"
    if any(c.get("restartCount", 0) > 0 for c in containers):
        return "Running"
    return "Pending"


def conditions(sandbox: bool, initialized: bool, containers: list[dict[str, Any]],
               previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PodReadyToStartContainers, Initialized, ContainersReady, Ready (PodScheduled is the scheduler's);
    a condition's lastTransitionTime changes only when its status does."""
    ready = bool(containers) and all(c.get("ready") for c in containers)
    wanted = {"PodReadyToStartContainers": sandbox, "Initialized": initialized, "ContainersReady": ready,
              "Ready": ready}
    old = {c["type"]: c for c in previous}
    out = []
    for kind, value in wanted.items():
        status = "True" if value else "False"
        cond = {"type": kind, "status": status, "lastProbeTime": None,
                "lastTransitionTime": now_iso()}
        if kind in old and old[kind].get("status") == status:
            cond["lastTransitionTime"] = old[kind].get("lastTransitionTime")
        if not value and kind in ("ContainersReady", "Ready"):
            unready = [c["name"] for c in containers if not c.get("ready")]
            cond["reason"] = "PodCompleted" if containers and all("terminated" in (c.get("state") or {})
                                                                  for c in containers) else "ContainersNotReady"
            cond["message"] = f"containers with unready status: [{' '.join(unready)}]"
        out.append(cond)
    return out


def termination_message(written: bytes, log_tail: bytes, policy: str, exit_code: int) -> str:
    """What the kubelet puts in state.terminated.message: the termination-log file (4096 bytes at most),
    or with FallbackToLogsOnError and a failure, the last 80 lines / 2048 bytes of the log."""
    text = written[:4096].decode(errors="replace")
    if not text.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        tail = b"\n".join(log_tail.splitlines()[-80:])[-2048:]
        text = tail.decode(errors="replace")
    return text


def terminated_reason(exit_code: int, oom: bool) -> str:
    if oom:
        return "OOMKilled"
    return "Completed" if exit_code == 0 else "Error"
