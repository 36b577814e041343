"""`python container.py SPEC.json`: start one container of a local-node pod, as a container runtime would.

This process joins the pod's network namespace, makes a new PID namespace and forks the container's
PID 1, which makes its own mount, UTS and IPC namespaces and:
  * builds a root of its own (a tmpfs with the host's top-level directories bind-mounted into it, a
    fresh /proc and /sys, and a private /tmp) and pivots into it;
  * bind-mounts the pod's volumes at their mount paths; a mount path that does not exist is made in a
    "shadow" of its nearest existing directory (a tmpfs holding bind mounts of that directory's
    entries), so the host's filesystem is never written to;
  * binds the pod's /etc/hosts and /etc/hostname (cluster DNS without a DNS server) and the container's
    /dev/termination-log; sets the hostname, the user and groups, the working directory;
  * and execs the command: it is PID 1 of its namespace (so, as in a real container, SIGTERM reaches it
    only if it handles SIGTERM, and when it exits the kernel kills everything else in the container).

This process stays as the container's parent: it writes PID 1's host pid to `pid_file`, waits, and
exits with its status (128 + signal when killed). It and PID 1 die with their parent (PDEATHSIG), so
nothing outlives the node. A failure before the exec is written to `start_error_file` (StartError).
Linux only; needs root.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from typing import Any

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 8192, 16384, 1 << 18)
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86-64
PR_SET_PDEATHSIG = 1

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    _check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                      data and data.encode()), f"mount {source} on {target}")


class Root:
    """The container's filesystem, built after unshare(CLONE_NEWNS) in PID 1."""

    def __init__(self, path: str):
        self.path = path
        self.ours = {"/"}  # directories on our own tmpfs (made here, not the host's)
        self.shadows = 0

    def build(self) -> None:
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
        mount("tmpfs", self.path, "tmpfs", MS_NOSUID, "mode=755")
        for entry in sorted(os.listdir("/")):
            src, dst = f"/{entry}", f"{self.path}/{entry}"
            if entry in ("proc", "sys", "tmp"):
                os.mkdir(dst, 0o1777 if entry == "tmp" else 0o555)
            elif os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            elif os.path.isdir(src):
                os.mkdir(dst)
                mount(src, dst, None, MS_BIND | MS_REC)
        os.mkdir(f"{self.path}/.old")
        _check(libc.syscall(SYS_PIVOT_ROOT, self.path.encode(), f"{self.path}/.old".encode()), "pivot_root")
        os.chdir("/")
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        try:  # sysfs of this network namespace (ip netns exec does the same)
            mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        except OSError:
            mount("/.old/sys", "/sys", None, MS_BIND | MS_REC)

    def host(self, path: str) -> str:
        """A host path, seen from inside before the old root is detached."""
        return "/.old" + path

    def ensure(self, path: str, directory: bool, owner: tuple[int, int] | None = None) -> None:
        """Make `path` exist (inside), shadowing the nearest existing host directory if it must."""
        if os.path.lexists(path):
            return
        existing = os.path.dirname(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        base = os.path.realpath(existing)
        missing = os.path.relpath(path, existing)
        if base not in self.ours:
            self._shadow(base)
        current = base
        parts = missing.split("/")
        for i, part in enumerate(parts):
            current = os.path.join(current, part)
            last = i == len(parts) - 1
            if last and not directory:
                with open(current, "w"):
                    pass
            else:
                os.mkdir(current, 0o755)
                self.ours.add(current)
            if owner is not None:
                os.chown(current, *owner)

    def expose(self, path: str) -> None:
        """Make every directory above `path` traversable by any user (an image's interpreter is; here it
        may live under the host's /root, mode 700), by shadowing the ones that are not."""
        current = "/"
        for part in os.path.realpath(path).strip("/").split("/"):
            current = os.path.join(current, part)
            if not os.path.isdir(current):
                return
            if os.stat(current).st_mode & 0o005 != 0o005 and current not in self.ours:
                self._shadow(current, extra_mode=0o005)

    def _shadow(self, directory: str, extra_mode: int = 0) -> None:
        st = os.stat(directory)
        self.shadows += 1
        staging = f"/.shadow-{self.shadows}"
        os.mkdir(staging)
        mount("tmpfs", staging, "tmpfs", MS_NOSUID, f"mode={(st.st_mode & 0o7777) | extra_mode:o}")
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)  # a shadow keeps what it covers read-only
        for entry in os.listdir(directory):
            src, dst = f"{directory}/{entry}", f"{staging}/{entry}"
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            if os.path.isdir(src):
                os.mkdir(dst)
                mount(src, dst, None, MS_BIND | MS_REC)
            else:
                with open(dst, "w"):
                    pass
                mount(src, dst, None, MS_BIND)
            if read_only:
                mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.chown(staging, st.st_uid, st.st_gid)
        mount(staging, directory, None, MS_MOVE)
        os.rmdir(staging)
        self.ours.add(directory)

    def bind(self, source: str, target: str, read_only: bool = False, owner: tuple[int, int] | None = None) -> None:
        src = self.host(source)
        self.ensure(target, os.path.isdir(src), owner)
        mount(src, target, None, MS_BIND | MS_REC)
        self.ours.discard(target)  # covered by the host's directory now
        if read_only:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)

    def read_only_root(self) -> None:
        for entry in os.listdir("/"):
            path = f"/{entry}"
            if entry in ("proc", "sys", "dev", "tmp", ".old") or os.path.islink(path) or not os.path.ismount(path):
                continue
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)

    def finish(self) -> None:
        _check(libc.umount2(b"/.old", MNT_DETACH), "umount /.old")
        os.rmdir("/.old")


def container_init(spec: dict[str, Any]) -> None:
    """PID 1: set up the filesystem and identity, then exec (never returns)."""
    # Opened before the root changes: where a failure before the exec is reported.
    start_error = open(spec["start_error_file"], "w")  # noqa: SIM115
    try:
        _init(spec)
    except BaseException as exc:
        start_error.write(str(exc) if isinstance(exc, StartError) else
                          "".join(traceback.format_exception(exc))[-2000:])
        start_error.close()
        os._exit(128)


def _init(spec: dict[str, Any]) -> None:
    # Mounts (and pivot_root) in PID 1's own mount namespace: the parent keeps the host's view.
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC), "unshare")
    root = Root(spec["rootfs"])
    root.build()
    uid, gid = spec.get("uid"), spec.get("gid")
    owner = (uid, gid if gid is not None else uid) if uid is not None else None
    root.bind(spec["tmp"], "/tmp")
    root.ours.add("/tmp")  # the pod's own directory: mount points may be made in it
    for m in sorted(spec["mounts"], key=lambda m: m["target"].count("/")):
        root.bind(m["source"], m["target"], m.get("readOnly", False))
        if m["target"].rstrip("/") == "/tmp":  # a volume of the pod's (an emptyDir for a read-only root)
            root.ours.add("/tmp")
    for path in spec.get("expose") or []:
        # The image's files (the venv, the checkout, the interpreter) may live under the host's /tmp (a
        # fresh clone in CI): seen through the pod's private /tmp at the same path.
        if os.path.realpath(path).startswith("/tmp/"):
            root.bind(os.path.realpath(path), os.path.realpath(path), read_only=True)
    for path in spec.get("expose") or []:
        root.expose(path)
    root.bind(spec["hosts"], "/etc/hosts")
    root.bind(spec["hostname_file"], "/etc/hostname")
    root.bind(spec["termination_log"], spec.get("termination_path") or "/dev/termination-log")
    cwd = spec.get("cwd") or "/"
    root.ensure(cwd, True, owner)
    if spec.get("read_only_root"):
        root.read_only_root()
    root.finish()
    name = spec["hostname"].encode()
    _check(libc.sethostname(name, len(name)), "sethostname")
    if gid is not None or spec.get("groups"):
        os.setgroups(spec.get("groups") or [])
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    os.chdir(cwd)
    env = spec["env"]
    command = spec["command"]
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise StartError(f'exec: "{command[0]}": {exc.strerror} (PATH={env.get("PATH", "")})') from exc


class StartError(Exception):
    pass


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    netns = os.open(spec["netns"], os.O_RDONLY)
    _check(libc.setns(netns, CLONE_NEWNET), "setns")
    os.close(netns)
    _check(libc.unshare(CLONE_NEWPID), "unshare")  # the next child is PID 1 of a new PID namespace
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        container_init(spec)
    with open(spec["pid_file"] + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(spec["pid_file"] + ".tmp", spec["pid_file"])
    # The node signals PID 1 itself; this process only reports how it ended.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
