"""Preemption: SIGTERM (a node drained, a spot instance reclaimed, Ctrl-C through `kubetrain run`)."""

from __future__ import annotations

import signal
import time
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
