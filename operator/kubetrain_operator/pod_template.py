"""spec.workers.podTemplate: which keys it may hold, where each goes, and what the operator's pod security lets a
job creator ask for (pure; never raises on any input).

The operator's own ServiceAccount creates the pods, so whoever may create an LLMTrainingJob would otherwise get
every power of `create pods` in that namespace, whatever RBAC says about pods. By default the operator holds the
template to Kubernetes' Pod Security "baseline" level (no host namespaces, no privileged containers, no added
capabilities, no hostPath, no host ports, no unconfined seccomp/AppArmor/SELinux) and lets it choose no
ServiceAccount; an administrator relaxes that on the operator (docs/operations.md, Security)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# podTemplate keys and where they go: the pod's metadata, the pod's spec, or the trainer container.
POD_TEMPLATE_META = ("labels", "annotations")
POD_TEMPLATE_POD = (
    "nodeSelector", "tolerations", "affinity", "volumes", "securityContext", "serviceAccountName",
    "priorityClassName", "schedulerName", "imagePullSecrets", "terminationGracePeriodSeconds",
    "runtimeClassName", "topologySpreadConstraints", "initContainers", "dnsPolicy", "dnsConfig",
    "hostNetwork", "hostIPC", "shareProcessNamespace",
)
POD_TEMPLATE_CONTAINER = ("env", "envFrom", "volumeMounts", "imagePullPolicy", "containerSecurityContext")
POD_TEMPLATE_KEYS = POD_TEMPLATE_META + POD_TEMPLATE_POD + POD_TEMPLATE_CONTAINER
_LISTS = ("tolerations", "volumes", "imagePullSecrets", "topologySpreadConstraints", "initContainers", "env",
          "envFrom", "volumeMounts")
_MAPS = ("labels", "annotations", "nodeSelector", "affinity", "securityContext", "containerSecurityContext",
         "dnsConfig")

BASELINE, PRIVILEGED = "baseline", "privileged"
ENV_LEVEL = "KUBETRAIN_OPERATOR_POD_SECURITY"
ENV_HOST_PATHS = "KUBETRAIN_OPERATOR_ALLOWED_HOST_PATHS"
ENV_SERVICE_ACCOUNTS = "KUBETRAIN_OPERATOR_ALLOWED_SERVICE_ACCOUNTS"
ENV_CAPABILITIES = "KUBETRAIN_OPERATOR_ALLOWED_CAPABILITIES"
# What the container runtime grants anyway (Pod Security baseline lets a pod "add" these: it changes nothing).
DEFAULT_CAPABILITIES = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                                  "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
_SELINUX_TYPES = ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")


@dataclass(frozen=True)
class PodSecurity:
    """What a job's podTemplate may ask for, as the operator's administrator set it (chart value podSecurity)."""

    level: str = BASELINE
    host_paths: tuple[str, ...] = ()  # hostPath volumes allowed at or below these paths
    service_accounts: tuple[str, ...] = ()  # names a job may choose ("*": any in its namespace)
    capabilities: tuple[str, ...] = ()  # capabilities a container may add beyond the runtime's defaults

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PodSecurity:
        env = os.environ if env is None else env

        def items(key: str) -> tuple[str, ...]:
            return tuple(v.strip() for v in env.get(key, "").split(",") if v.strip())

        return cls(env.get(ENV_LEVEL, BASELINE).strip() or BASELINE, items(ENV_HOST_PATHS),
                   items(ENV_SERVICE_ACCOUNTS), items(ENV_CAPABILITIES))

    def config_error(self) -> str | None:
        if self.level in (BASELINE, PRIVILEGED):
            return None
        return (f"the operator's {ENV_LEVEL} ({self.level!r}) must be {BASELINE} or {PRIVILEGED} (chart value "
                f"podSecurity.level); the operator refuses every job until it is fixed")

    def host_path_allowed(self, path: Any) -> bool:
        if not isinstance(path, str) or not path.startswith("/") or "/.." in path:
            return False
        return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in self.host_paths)


def shape_errors(template: dict[str, Any]) -> list[str]:
    """The template's keys and their types (what the CRD schema leaves open)."""
    errors = []
    for key, value in template.items():
        where = f"spec.workers.podTemplate.{key}"
        if key not in POD_TEMPLATE_KEYS:
            errors.append(f"{where}: not supported; use one of {', '.join(sorted(POD_TEMPLATE_KEYS))}")
        elif key in _LISTS and not isinstance(value, list):
            errors.append(f"{where}: must be a list")
        elif key in _MAPS and not isinstance(value, dict):
            errors.append(f"{where}: must be a mapping")
        elif key in _LISTS and not all(isinstance(item, dict) for item in value):
            errors.append(f"{where}: every item must be a mapping")
        elif key in ("labels", "annotations", "nodeSelector") and not all(
                isinstance(v, str) for v in value.values()):
            errors.append(f"{where}: values must be strings")
    return errors


def security_errors(template: dict[str, Any], security: PodSecurity) -> list[str]:
    """What the template asks for beyond the operator's pod security, each naming the field and who can relax
    it. Call after shape_errors found nothing (types are as shape_errors requires)."""
    config = security.config_error()
    if config:
        return [config]
    if security.level == PRIVILEGED:
        return []
    relax = f"remove it, or ask the operator's administrator to allow it ({_how_to_relax()})"
    errors = [f"{where}: {why}; {relax}" for where, why in _refusals(template, security)]
    sa = template.get("serviceAccountName")
    if sa is not None and "*" not in security.service_accounts and sa not in security.service_accounts:
        errors.append(f"spec.workers.podTemplate.serviceAccountName ({sa!r}): the operator lets jobs use only the "
                      f"ServiceAccounts its administrator lists (chart value podSecurity.allowedServiceAccounts, "
                      f"now {list(security.service_accounts)}): a job would otherwise act with that account's "
                      f"rights; remove it or have it listed")
    return errors


def _how_to_relax() -> str:
    return (f"chart values podSecurity.level: {PRIVILEGED}, podSecurity.allowedHostPaths or "
            f"podSecurity.allowedCapabilities; docs/operations.md, Security")


def _refusals(template: dict[str, Any], security: PodSecurity) -> Iterator[tuple[str, str]]:
    base = "spec.workers.podTemplate"
    for key, what in (("hostNetwork", "the node's network"), ("hostIPC", "the node's IPC namespace"),
                      ("shareProcessNamespace", "one process namespace between containers")):
        if template.get(key) is True:
            yield f"{base}.{key}", f"the operator's pod security ({security.level}) refuses {what}"
    yield from _pod_context_refusals(f"{base}.securityContext", template.get("securityContext", {}))
    yield from _container_context_refusals(f"{base}.containerSecurityContext",
                                           template.get("containerSecurityContext", {}), security)
    for i, volume in enumerate(template.get("volumes", [])):
        host_path = volume.get("hostPath")
        if host_path is not None:
            path = host_path.get("path") if isinstance(host_path, dict) else None
            if not security.host_path_allowed(path):
                yield (f"{base}.volumes[{i}].hostPath ({path!r})",
                       f"hostPath volumes expose the node's files; allowed paths: {list(security.host_paths)}")
    for i, init in enumerate(template.get("initContainers", [])):
        where = f"{base}.initContainers[{i}]"
        yield from _container_context_refusals(f"{where}.securityContext", init.get("securityContext"), security)
        for j, port in enumerate(init.get("ports") or []):
            if isinstance(port, dict) and port.get("hostPort"):
                yield f"{where}.ports[{j}].hostPort", "host ports bind the node's network"


def _pod_context_refusals(where: str, context: Any) -> Iterator[tuple[str, str]]:
    if not isinstance(context, dict):
        return
    yield from _confinement_refusals(where, context)
    windows = context.get("windowsOptions")
    if isinstance(windows, dict) and windows.get("hostProcess") is True:
        yield f"{where}.windowsOptions.hostProcess", "host processes run on the node itself"


def _container_context_refusals(where: str, context: Any, security: PodSecurity) -> Iterator[tuple[str, str]]:
    if context is None:
        return
    if not isinstance(context, dict):
        yield where, "must be a mapping"
        return
    if context.get("privileged") is True:
        yield f"{where}.privileged", "privileged containers have every power of the node"
    capabilities = context.get("capabilities")
    added = capabilities.get("add") if isinstance(capabilities, dict) else None
    if added is not None:
        extra = sorted(str(c) for c in (added if isinstance(added, list) else [added])
                       if str(c).upper().removeprefix("CAP_") not in DEFAULT_CAPABILITIES | set(security.capabilities))
        if extra:
            yield (f"{where}.capabilities.add ({extra})",
                   f"added capabilities are refused (dropping is fine); allowed: {list(security.capabilities)}")
    if context.get("procMount") not in (None, "Default"):
        yield f"{where}.procMount", "an unmasked /proc shows the node's kernel settings"
    yield from _confinement_refusals(where, context)
    windows = context.get("windowsOptions")
    if isinstance(windows, dict) and windows.get("hostProcess") is True:
        yield f"{where}.windowsOptions.hostProcess", "host processes run on the node itself"


def _confinement_refusals(where: str, context: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """seccomp, AppArmor and SELinux: a pod may tighten them, not turn them off (Pod Security baseline)."""
    for key in ("seccompProfile", "appArmorProfile"):
        profile = context.get(key)
        if isinstance(profile, dict) and profile.get("type") == "Unconfined":
            yield f"{where}.{key}.type", "an unconfined profile turns the kernel's filter off"
    selinux = context.get("seLinuxOptions")
    if isinstance(selinux, dict) and (selinux.get("user") or selinux.get("role")
                                      or selinux.get("type", "") not in _SELINUX_TYPES):
        yield f"{where}.seLinuxOptions", f"only the container types {list(_SELINUX_TYPES[1:])} may be chosen"
