"""torch.compile's caches kept beside the checkpoints, so that a restart on a fresh disk (a replaced pod, another
machine) compiles warm: ~5 s instead of ~25 s for the tiny preset on 2 CPU threads (docs/benchmarks.md §1).

Inductor keeps what it compiled (FX graphs, AOTAutograd graphs, generated C++/Triton code and its binaries) in
one directory, TORCHINDUCTOR_CACHE_DIR. The run points it at `<output>/compile-cache` (unless it is set), the
first process of every node unpacks `<checkpoint.uri>/compile-cache/<key>.tar.gz` into it before the first
compiled step, and rank 0 packs and stores it after that step when it holds files the stored copy did not.
The key names the torch and Python versions and the device, the inputs inductor's own keys do not pin down
across machines; a wrong or stale archive costs only cache misses (inductor checks each entry's own key).
Torch's portable `save_cache_artifacts` was not enough on CPU: it leaves out the compiled C++ libraries, so a
load saved 5 s of 25.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .storage import Store

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
CACHE_PREFIX = "compile-cache/"
# Lock files and temporary files of a compile in progress are the process's own, not cache content.
_NOT_CONTENT = ("locks/",)


@dataclass
class CacheState:
    directory: Path
    key: str  # the store's key of the archive
    restored: bool = False
    restored_files: frozenset[str] = frozenset()


def archive_key(device: torch.device) -> str:
    """The store key of this machine's archive: torch, Python and the device kind (a GPU's compute capability:
    Triton binaries are built for one)."""
    where = device.type
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"cuda-sm{major}{minor}"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    version = torch.__version__.replace("+", "-")
    return f"{CACHE_PREFIX}torch-{version}-{python}-{where}.tar.gz"


def cache_directory(output: Path) -> Path:
    """Inductor's cache directory for this process: TORCHINDUCTOR_CACHE_DIR as the user set it, else
    `<output>/compile-cache` (set in the environment here, before anything compiles, so that inductor and its
    compile subprocesses use it) rather than inductor's default, a directory in /tmp shared by every run."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    from torch._inductor.utils import clear_caches

    # Inductor writes its default into the environment the first time it looks (torch's imports may have).
    configured = os.environ.get(CACHE_ENV)
    if configured and os.path.abspath(configured) != os.path.abspath(default_cache_dir()):
        return Path(configured)
    directory = (output / "compile-cache").resolve()
    os.environ[CACHE_ENV] = str(directory)
    clear_caches()  # paths inductor derived from the default (as torch's own temporary_cache_dir does)
    return directory


def cache_files(directory: Path) -> frozenset[str]:
    """The cache's content: its files' paths relative to `directory`."""
    if not directory.is_dir():
        return frozenset()
    return frozenset(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                     if p.is_file() and not p.relative_to(directory).as_posix().startswith(_NOT_CONTENT))


def pack(directory: Path, files: frozenset[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name in sorted(files):
            tar.add(directory / name, arcname=name, recursive=False)
    return buffer.getvalue()


def unpack(data: bytes, directory: Path) -> int:
    """Extracts an archive into `directory` (only regular files and directories, never outside it: the
    `data` filter); returns the number of files."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        tar.extractall(directory, members=members, filter="data")
        return sum(m.isfile() for m in members)


def restore(store: Store, directory: Path, key: str) -> CacheState:
    """The first process of a node, before the first compiled step: the stored archive into `directory`,
    if the store has one. Any failure leaves a cold cache, never a failed run."""
    state = CacheState(directory, key)
    try:
        if key in store.list(key):
            count = unpack(store.get(key), directory)
            state.restored = True
            log.info("compile cache: %d files restored from %s", count, store.child_uri(key))
    except Exception as exc:  # a cache, not an input: compile cold rather than stop
        log.warning("compile cache: could not restore %s (%s: %s); compiling cold", store.child_uri(key),
                    type(exc).__name__, exc)
    state.restored_files = cache_files(directory)
    return state


def publish(store: Store, state: CacheState) -> int:
    """Rank 0 after the first compiled step: the cache into the store if it holds files the restored archive
    did not; returns the archive's size (0: nothing new, or the put failed, which is logged)."""
    files = cache_files(state.directory)
    if not files - state.restored_files:
        return 0
    try:
        data = pack(state.directory, files)
        store.put(state.key, data)
    except Exception as exc:
        log.warning("compile cache: could not store %s (%s: %s)", store.child_uri(state.key), type(exc).__name__,
                    exc)
        return 0
    state.restored_files = files
    log.info("compile cache: %d files (%.1f MB) stored at %s", len(files), len(data) / 1e6,
             store.child_uri(state.key))
    return len(data)
