"""What the local node makes of an image, as pure functions: the image map's entries (`Image`, read from a
Dockerfile's last stage: ENV, USER, WORKDIR, ENTRYPOINT, CMD and the users its `useradd`s make), the
container's /etc/passwd, /etc/group and HOME, and resolving an image reference against the map.
There are no real images: an image is the host's filesystem with this checkout's venv first on PATH."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
    expose = [os.path.realpath(sys.base_prefix), str(venv), str(ROOT)]  # ROOT: the venv's editable install
    return Image(venv=str(venv), env=env, user=user, workdir=workdir, entrypoint=entrypoint, cmd=cmd, expose=expose,
                 users=users)


def _useradd(command: str) -> str | None:
    """The /etc/passwd line that `useradd --uid N [--user-group|--gid G] [--home-dir D] [--shell S] NAME` writes."""
    try:  # (RUN split at && and ; may cut a quoted argument, e.g. python -c "a; b": not a useradd)
        words = shlex.split(command)
    except ValueError:
        return None
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
