"""events.jsonl: rank 0's append-only JSON-lines log of the run (start, step, eval, checkpoint,
checkpoint_failed, preempted, error, done); `kubetrain run`'s progress bar and summary read it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Events:
    """Writes one JSON object per line; with no path (ranks other than 0) it writes nothing."""

    def __init__(self, path: Path | None):
        self._fh = path.open("a", buffering=1) if path else None

    def emit(self, kind: str, **fields: Any) -> None:
        if self._fh:
            self._fh.write(json.dumps({"type": kind, "time": time.time(), **fields}) + "\n")
