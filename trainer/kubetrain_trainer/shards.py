"""Reading prepared shards (what preparation.py wrote): memory-mapped locally, ranged GETs on S3,
packed into fixed-length sequences. Which sequences a step reads is sampler.py's job.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from kubetrain_api.config import S3Spec

from .errors import ConfigError
from .preparation import INDEX


class TokenShards:
    """Sequence i is seqLength+1 consecutive tokens (inputs and shifted targets) from one shard.

    Local shards are memory-mapped. Shards under s3:// are read with ranged GETs of exactly the
    sequences needed, prefetched a step ahead into a bounded in-memory cache: the sampler visits
    sequences in a global random order, so whole-shard caching would re-download shards constantly.
    """

    def __init__(self, root: str | Path, seq_length: int, field_name: str = "data.train",
                 s3: S3Spec | None = None, cache_sequences: int = 65536):
        self.root = str(root)
        self.seq_length = seq_length
        self._remote: _RemoteSequences | None = None
        if self.root.startswith("s3://"):
            self._remote = _RemoteSequences(self.root, seq_length, field_name, s3 or S3Spec(), cache_sequences)
            self.index = self._remote.index
            tokens = [int(s["tokens"]) for s in self.index["shards"]]
            self._memmaps: list[np.ndarray] = []
        else:
            index_path = Path(self.root) / INDEX
            if not index_path.is_file():
                raise ConfigError(f"{field_name}: {self.root} is not a prepared shard directory (no {INDEX}); "
                                  f"run `kubetrain prepare` or point it at raw text with `kubetrain run`")
            self.index = json.loads(index_path.read_text())
            dtype = np.dtype(self.index["dtype"])
            self._memmaps = [np.memmap(Path(self.root) / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                             for s in self.index["shards"]]
            tokens = [len(m) for m in self._memmaps]
        counts = np.array([(n - 1) // seq_length if n > seq_length else 0 for n in tokens], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.tokenizer_fingerprint: str = self.index.get("tokenizer", "")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, first token) of sequence i."""
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, (i - int(self._starts[s])) * self.seq_length

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """A [len(indices), seqLength+1] int64 tensor of the given sequences."""
        out = np.empty((len(indices), self.seq_length + 1), dtype=np.int64)
        if self._remote is not None:
            for row, seq in enumerate(self._remote.get([self.locate(i) for i in indices.tolist()])):
                out[row] = seq
            return torch.from_numpy(out)
        for row, i in enumerate(indices.tolist()):
            s, start = self.locate(i)
            out[row] = self._memmaps[s][start : start + self.seq_length + 1]
        return torch.from_numpy(out)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start fetching sequences that will be needed soon (a no-op for local shards)."""
        if self._remote is not None:
            self._remote.prefetch([self.locate(i) for i in indices.tolist()])


class _RemoteSequences:
    def __init__(self, uri: str, seq_length: int, field_name: str, s3: S3Spec, capacity: int):
        from .storage import S3Store, start_error

        self.store = S3Store(uri, s3)
        try:
            self.index = json.loads(self.store.get(INDEX))
        except Exception as exc:
            raise start_error(f"{field_name}: cannot read {uri.rstrip('/')}/{INDEX}", exc,
                              "point it at a prefix written by `kubetrain prepare --output s3://...`") from exc
        self.files = [s["file"] for s in self.index["shards"]]
        self.dtype = np.dtype(self.index["dtype"])
        self.seq_length = seq_length
        self.capacity = capacity
        self.cache: OrderedDict[tuple[int, int], cf.Future] = OrderedDict()
        self.lock = threading.Lock()
        self.pool = cf.ThreadPoolExecutor(max_workers=s3.max_concurrency, thread_name_prefix="s3-data")

    def _fetch(self, key: tuple[int, int]) -> np.ndarray:
        shard, start = key
        size = self.dtype.itemsize
        raw = self.store.get_range(self.files[shard], start * size, (self.seq_length + 1) * size)
        return np.frombuffer(raw, dtype=self.dtype).astype(np.int64)

    def _futures(self, keys: list[tuple[int, int]]) -> list[cf.Future]:
        with self.lock:
            out = []
            for key in keys:
                fut = self.cache.get(key)
                if fut is None:
                    fut = self.pool.submit(self._fetch, key)
                    self.cache[key] = fut
                else:
                    self.cache.move_to_end(key)
                out.append(fut)
            while len(self.cache) > self.capacity:  # bounded: drop the least recently used
                self.cache.popitem(last=False)
            return out

    def prefetch(self, keys: list[tuple[int, int]]) -> None:
        self._futures(keys)

    def get(self, keys: list[tuple[int, int]]) -> list[np.ndarray]:
        return [f.result() for f in self._futures(keys)]
