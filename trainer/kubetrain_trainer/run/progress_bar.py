"""`kubetrain run`'s progress display: rank 0's events as a one-line bar on a terminal, or as periodic
lines (CI logs).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any


class Progress:
    """A one-line progress bar on a terminal; periodic lines otherwise (CI logs)."""

    def __init__(self, max_steps: int, stream: Any = sys.stdout):
        self.max_steps, self.stream = max_steps, stream
        self.tty = stream.isatty()
        self.times: deque[float] = deque(maxlen=20)
        self.last_print = 0.0
        self.eval_loss: float | None = None

    def update(self, ev: dict[str, Any]) -> None:
        if ev["type"] == "eval":
            self.eval_loss = ev["loss"]
            self._line(f"  eval at step {ev['step']}: validation loss {ev['loss']:.4f}, "
                       f"perplexity {ev['perplexity']:.1f}")
        elif ev["type"] == "checkpoint":
            self._line(f"  checkpoint at step {ev['step']} committed ({ev['seconds']:.1f}s)")
        elif ev["type"] == "step":
            self.times.append(ev["seconds"])
            step = ev["step"]
            eta = (self.max_steps - step) * sum(self.times) / len(self.times)
            width = 24
            filled = int(width * step / self.max_steps)
            bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
            text = (f"step {step}/{self.max_steps} [{bar}] loss {ev['loss']:.4f} | "
                    f"{ev['tokensPerSecond']:,.0f} tok/s | ETA {duration(eta)}")
            now = time.monotonic()
            if self.tty:
                self.stream.write("\r" + text + " " * 4)
                self.stream.flush()
            elif now - self.last_print > 10 or step == self.max_steps:
                self.last_print = now
                self.stream.write(text + "\n")
                self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
