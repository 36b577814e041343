"""The local node's network: one Linux bridge per test bed with a private /24, one network namespace per
pod (lo up, a veth on the bridge, an address of that /24, no default route), and a TCP forwarder from the
bridge's host address to the API server on 127.0.0.1.

Only addresses of the bridge this module creates are ever used; nothing here routes anywhere else
(no default route in a pod, IP forwarding is left as it is). Everything is named `kt<6 hex>…` and
recorded with the creating process's pid in /run/kubetrain-testbed/, so a later start removes what a
killed run left behind (`sweep`).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RECORDS = Path("/run/kubetrain-testbed")
NETNS_DIR = Path("/run/netns")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_networks() -> list[ipaddress.IPv4Network]:
    routes = json.loads(ip("-j", "-4", "route", "show", "table", "all").stdout or "[]")
    out = []
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default" and dst[0].isdigit():
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
    return out


def sweep() -> None:
    """Remove bridges, pod namespaces and their records whose creating process is gone."""
    if not RECORDS.exists():
        return
    for record in RECORDS.glob("*.json"):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(data.get("pid", 0))):
            continue
        tag = data["tag"]
        for ns in NETNS_DIR.glob(f"{tag}-*") if NETNS_DIR.exists() else []:
            ip("netns", "delete", ns.name, check=False)
        ip("link", "delete", tag, check=False)
        hosts = Path("/etc/netns")
        for d in hosts.glob(f"{tag}-*") if hosts.exists() else []:
            shutil.rmtree(d, ignore_errors=True)
        record.unlink(missing_ok=True)
        lease = RECORDS / f"{tag}.ipam"
        lease.unlink(missing_ok=True)


@dataclass
class Network:
    """A bridge `tag` with the host at `gateway` on `subnet`; `api_port` forwards to the API server."""

    tag: str
    subnet: ipaddress.IPv4Network
    gateway: str
    api_port: int = 0
    forwarder_pid: int = 0

    @classmethod
    def create(cls, api_server_port: int | None) -> Network:
        """A new bridge; with `api_server_port`, the forwarder to the API server on 127.0.0.1 too."""
        sweep()
        RECORDS.mkdir(parents=True, exist_ok=True)
        used = _used_networks()
        for _ in range(200):
            subnet = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
            if not any(subnet.overlaps(u) for u in used):
                break
        else:
            raise RuntimeError("no free 10.200-250.x.0/24 for the test bridge")
        tag = "kt" + secrets.token_hex(3)
        gateway = str(subnet.network_address + 1)
        net = cls(tag=tag, subnet=subnet, gateway=gateway)
        net._record()
        # A fixed (locally administered) MAC: a bridge without one takes the lowest of its ports' MACs and changes
        # it whenever that port goes, and the other pods, still sending to the old gateway MAC, lose the API server
        # (connects hang until their ARP entries expire) each time a pod is deleted.
        mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        ip("link", "add", tag, "address", mac, "type", "bridge")
        ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", tag)
        ip("link", "set", tag, "up")
        if api_server_port is not None:
            net._start_forwarder(api_server_port)
        net._record()
        return net

    def _record(self) -> None:
        (RECORDS / f"{self.tag}.json").write_text(json.dumps({"tag": self.tag, "pid": os.getpid(),
                                                              "subnet": str(self.subnet)}))

    def _start_forwarder(self, target_port: int) -> None:
        import socket

        with socket.socket() as s:  # a free port on the bridge address
            s.bind((self.gateway, 0))
            self.api_port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forward.py")),
                                 f"{self.gateway}:{self.api_port}", f"127.0.0.1:{target_port}"],
                                preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
        self.forwarder_pid = proc.pid
        from .client import wait_port

        wait_port(self.gateway, self.api_port, timeout=20)

    def allocate(self) -> str:
        """The next free pod address (a lease file shared by the nodes of this network)."""
        with open(RECORDS / f"{self.tag}.ipam", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            taken = set(f.read().split())
            for host in list(self.subnet.hosts())[1:]:
                if str(host) not in taken:
                    f.write(f"{host}\n")
                    return str(host)
        raise RuntimeError(f"{self.subnet} is full")

    def release(self, address: str) -> None:
        with open(RECORDS / f"{self.tag}.ipam", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            kept = [a for a in f.read().split() if a != address]
            f.seek(0)
            f.truncate()
            f.write("".join(a + "\n" for a in kept))

    def create_pod_netns(self, name: str, address: str) -> None:
        """Namespace `name` with lo up and eth0 = `address` on the bridge (its veth is `name`'s host end)."""
        host_end = "v" + name.removeprefix("kt")[:14]
        ip("netns", "add", name)
        try:
            ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("link", "set", host_end, "master", self.tag, "up")
            ip("-n", name, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")  # without lo, torchrun's rendezvous hangs
        except Exception:
            self.delete_pod_netns(name)
            raise

    def delete_pod_netns(self, name: str) -> None:
        ip("netns", "delete", name, check=False)  # takes the veth pair with it

    def to_json(self) -> str:
        return json.dumps({"tag": self.tag, "subnet": str(self.subnet), "gateway": self.gateway,
                           "api_port": self.api_port})

    @classmethod
    def from_json(cls, text: str) -> Network:
        d = json.loads(text)
        return cls(tag=d["tag"], subnet=ipaddress.ip_network(d["subnet"]), gateway=d["gateway"],
                   api_port=d["api_port"])

    def destroy(self) -> None:
        if self.forwarder_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.forwarder_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.forwarder_pid, 0)
        for ns in NETNS_DIR.glob(f"{self.tag}-*") if NETNS_DIR.exists() else []:
            ip("netns", "delete", ns.name, check=False)
        ip("link", "delete", self.tag, check=False)
        (RECORDS / f"{self.tag}.json").unlink(missing_ok=True)
        (RECORDS / f"{self.tag}.ipam").unlink(missing_ok=True)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the process that started it dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)
