"""Saving a DCP checkpoint to a local directory: DCP's FileSystemWriter, staging through staging.py and
counting the bytes it writes (for the checkpoint bytes and throughput metrics).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter

from .staging import CachedStaging


class CountingFileSystem(FileSystem):
    """The local FileSystem, counting bytes written (for the bytes and throughput metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_written = 0

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            yield stream
        if mode == "wb":
            self.bytes_written += os.path.getsize(path)


class LocalWriter(CachedStaging, FileSystemWriter):
    def __init__(self, path: str, thread_count: int = 1):
        super().__init__(path, sync_files=True, thread_count=thread_count, cache_staged_state_dict=True)
        self.fs = CountingFileSystem()
