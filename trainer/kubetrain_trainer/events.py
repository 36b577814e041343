"""events.jsonl: rank 0's append-only JSON-lines log of the run (on other nodes only the error, which the first
process of each node records for its pod's entrypoint; the kinds and fields are
kubetrain_api.contract's); `kubetrain run`'s progress bar and summary and the pod entrypoint read it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kubetrain_api.contract import EVENT_KINDS, EventKind


class Events:
    """Writes one JSON object per line; with no path (ranks other than 0) it writes nothing."""

    def __init__(self, path: Path | None):
        self._fh = path.open("a", buffering=1) if path else None

    def emit(self, kind: EventKind, **fields: Any) -> None:
        if kind not in EVENT_KINDS:  # a kind the readers do not know would be silently ignored by them
            raise ValueError(f"unknown event kind {kind!r}; add it to kubetrain_api.contract.EventKind")
        if self._fh:
            self._fh.write(json.dumps({"type": kind, "time": time.time(), **fields}) + "\n")
