"""Preemption: SIGTERM (a node drained, a spot instance reclaimed, Ctrl-C through `kubetrain run`); and the
parent-death signal that ends a trainer whose launcher was killed."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any


class Preemption:
    """SIGTERM only sets a flag: the loop finishes its step, all ranks agree, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        self.received_at = 0.0
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.received_at = time.monotonic()
        self.requested = True


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int, parent: int | None = None) -> Callable[[], None]:
    """A function that has the kernel send `sig` to the calling process when its parent dies: a launcher
    killed with SIGKILL (`kubetrain run`, torchrun) forwards nothing, and its children would train on. The
    setting survives exec, so the function also serves as a Popen preexec_fn (libc is loaded here, before the
    fork). If the parent is already gone when it runs (`parent`: its pid; else the process was reparented to
    init), the process signals itself. A no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        orphaned = os.getppid() != parent if parent is not None else os.getppid() == 1
        if orphaned:
            os.kill(os.getpid(), sig)

    return arm
