"""What a kubelet decides, as pure functions over API objects: images, environment, $(VAR) expansion,
users, the pod's /etc/hosts from EndpointSlices, container states and the pod's phase and conditions.
`node.py` does the I/O around them."""

from __future__ import annotations

import base64
import datetime as dt
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- images -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What the local node runs for an image: the host's filesystem with `venv/bin` first on PATH, and
    the image's ENV, USER, WORKDIR, ENTRYPOINT and CMD (read from its Dockerfile's last stage)."""

    venv: str
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)  # host paths the image's users must reach (its interpreter)
    users: list[str] = field(default_factory=list)  # /etc/passwd lines its `useradd`s made (name:x:uid:gid::home:shell)

    def to_json(self) -> dict[str, Any]:
        return {"venv": self.venv, "env": self.env, "user": self.user, "workdir": self.workdir,
                "entrypoint": self.entrypoint, "cmd": self.cmd, "expose": self.expose, "users": self.users}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Image:
        return cls(**d)


def image_from_dockerfile(dockerfile: Path, venv: Path, extra_env: dict[str, str] | None = None) -> Image:
    """The last stage's ENV, USER, WORKDIR, ENTRYPOINT and CMD; the image's own venv is replaced by `venv`
    (its PATH entries ending in /bin that are not system directories become venv/bin)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stage: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stage = []
        stage.append(line)
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    user = workdir = None
    entrypoint: list[str] = []
    cmd: list[str] = []
    users: list[str] = []
    import json

    for line in stage:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ENV":
            for item in shlex.split(rest):
                if "=" in item:
                    k, v = item.split("=", 1)
                    env[k] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), v)
        elif word == "USER":
            user = rest.strip()
        elif word == "RUN":
            users += [u for command in re.split(r"&&|;", rest) if (u := _useradd(command))]
        elif word == "WORKDIR":
            workdir = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest) if rest.strip().startswith("[") else ["/bin/sh", "-c", rest]
            if word == "ENTRYPOINT":
                entrypoint, cmd = value, []
            else:
                cmd = value
    system = set(DEFAULT_PATH.split(":"))
    path = [p for p in env["PATH"].split(":") if p and p in system]
    env["PATH"] = ":".join([str(venv / "bin"), *path])
    env.update(extra_env or {})
    import os
    import sys

    expose = [os.path.realpath(sys.base_prefix), str(venv), str(ROOT)]  # ROOT: the venv's editable install
    return Image(venv=str(venv), env=env, user=user, workdir=workdir, entrypoint=entrypoint, cmd=cmd, expose=expose,
                 users=users)


def _useradd(command: str) -> str | None:
    """The /etc/passwd line that `useradd --uid N [--user-group|--gid G] [--home-dir D] [--shell S] NAME` writes."""
    words = shlex.split(command)
    if not words or words[0] != "useradd":
        return None
    valued = {"-u": "uid", "--uid": "uid", "-g": "gid", "--gid": "gid", "-d": "home", "--home-dir": "home",
              "-s": "shell", "--shell": "shell"}
    opts: dict[str, str] = {}
    names, i = [], 1
    while i < len(words):
        if words[i] in valued and i + 1 < len(words):
            opts[valued[words[i]]] = words[i + 1]
            i += 1
        elif not words[i].startswith("-"):
            names.append(words[i])
        i += 1
    if "uid" not in opts or not names:
        return None
    name, uid = names[-1], opts["uid"]
    return f"{name}:x:{uid}:{opts.get('gid', uid)}::{opts.get('home', f'/home/{name}')}:{opts.get('shell', '/bin/sh')}"


def image_passwd(image: Image, host_passwd: str) -> str:
    """The container's /etc/passwd: the node's (its filesystem is the image's here) plus the image's users."""
    lines = host_passwd.splitlines()
    taken = {line.split(":")[0] for line in lines} | {line.split(":")[2] for line in lines if line.count(":") >= 2}
    extra = [u for u in image.users if u.split(":")[0] not in taken and u.split(":")[2] not in taken]
    return "\n".join(lines + extra) + "\n"


def image_group(image: Image, host_group: str) -> str:
    """The container's /etc/group: the node's plus a group of each image user's name and gid (--user-group)."""
    lines = host_group.splitlines()
    taken = {line.split(":")[0] for line in lines} | {line.split(":")[2] for line in lines if line.count(":") >= 2}
    extra = [f"{name}:x:{gid}:" for name, _, _, gid, *_ in (u.split(":") for u in image.users)
             if name not in taken and gid not in taken]
    return "\n".join(lines + extra) + "\n"


def home_directory(uid: int, passwd: str) -> str:
    """HOME as a container runtime sets it when the image and pod do not: the user's entry, else "/"."""
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 6 and parts[2] == str(uid):
            return parts[5] or "/"
    return "/"


def repository(image: str) -> str:
    """`ghcr.io/x/y:1.0` and `ghcr.io/x/y@sha256:…` → `ghcr.io/x/y`."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


def resolve_image(image: str, images: dict[str, Image]) -> Image | None:
    """An exact reference first, then the repository whatever the tag: the node's image map."""
    return images.get(image) or images.get(repository(image))


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
