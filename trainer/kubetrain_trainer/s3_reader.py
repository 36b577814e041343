"""Loading a DCP checkpoint from S3: `S3Reader` fetches exactly the byte ranges each rank's load plan
needs, with parallel ranged GETs straight into memory (nothing is copied to local disk). DCP stores a
rank's tensors back to back, so adjacent ranges are coalesced into a few large GETs.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from .s3_writer import S3FileSystem, object_key
from .storage import S3Store


@dataclass
class ReadGroup:
    """Adjacent byte ranges of one logical file fetched together: (item, offset in group, length) each."""

    name: str
    start: int
    length: int
    items: list[tuple[Any, int, int]] = field(default_factory=list)


def coalesce_reads(requests: list[tuple[str, int, int, Any]], limit: int, gap: int = 256 * 1024) -> list[ReadGroup]:
    """Merge (name, offset, length, item) requests of the same file whose ranges are adjacent (or at most
    `gap` bytes apart) into groups of at most `limit` bytes; an item longer than `limit` is a group of its
    own. DCP stores a rank's tensors back to back, so a load needs a few large GETs instead of one per
    tensor: fewer requests (S3 throttles by request rate) and no per-request cost per tensor."""
    groups: list[ReadGroup] = []
    for name, offset, length, item in sorted(requests, key=lambda r: (r[0], r[1])):
        last = groups[-1] if groups else None
        if (last is not None and last.name == name and last.start + last.length <= offset
                <= last.start + last.length + gap and offset + length - last.start <= limit):
            last.items.append((item, offset - last.start, length))
            last.length = offset + length - last.start
        else:
            groups.append(ReadGroup(name, offset, length, [(item, 0, length)]))
    return groups


def split_ranges(start: int, length: int, object_size: int, limit: int) -> list[tuple[int, int, int]]:
    """(object index, offset within the object, length) GETs covering [start, start + length): none
    crosses an object boundary or exceeds `limit` bytes."""
    out = []
    while length > 0:
        index, within = divmod(start, object_size)
        take = min(length, object_size - within, limit)
        out.append((index, within, take))
        start, length = start + take, length - take
    return out


class S3Reader(FileSystemReader):
    """Loads exactly the byte ranges this rank's plan needs: adjacent ranges coalesced into GETs of at
    most `part_size_bytes`, `max_concurrency` of them at a time, straight into memory."""

    def __init__(self, store: S3Store, step_key: str, object_size: int):
        super().__init__(step_key)
        self.store = store
        self.object_size = object_size
        self.fs = S3FileSystem(store)  # type: ignore[assignment]
        self.path = step_key
        self.requests = 0  # GETs issued by the last read_data (for tests and benchmarks)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = str(checkpoint_id)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        spec = self.store.spec
        requests = []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            requests.append((info.relative_path, info.offset, info.length, req))
        groups = coalesce_reads(requests, spec.part_size_bytes)
        # GETs in file order: (group number, object key, offset within object, length, offset in group)
        gets = []
        for number, group in enumerate(groups):
            at = 0
            for index, within, take in split_ranges(group.start, group.length, self.object_size, spec.part_size_bytes):
                gets.append((number, object_key(f"{self.path}/{group.name}", index), within, take, at))
                at += take
        self.requests = len(gets)
        left = {n: 0 for n in range(len(groups))}
        for number, *_ in gets:
            left[number] += 1
        buffers: dict[int, bytearray] = {}

        def fetch(buf: bytearray, key: str, within: int, take: int, at: int) -> None:
            buf[at:at + take] = self.store.get_range(key, within, take)

        # GETs run concurrently with a bounded read-ahead; tensors are committed in this thread as soon as
        # their group is complete, and the group's buffer is dropped.
        window = max(1, spec.max_concurrency)
        with cf.ThreadPoolExecutor(max_workers=window, thread_name_prefix="s3-read") as pool:
            pending: dict[cf.Future, int] = {}
            position = 0
            while position < len(gets) or pending:
                while position < len(gets) and len(pending) < 2 * window:
                    number, key, within, take, at = gets[position]
                    buf = buffers.setdefault(number, bytearray(groups[number].length))
                    pending[pool.submit(fetch, buf, key, within, take, at)] = number
                    position += 1
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    number = pending.pop(fut)
                    fut.result()
                    left[number] -= 1
                    if left[number] == 0:
                        view = memoryview(buffers.pop(number))
                        for req, at, length in groups[number].items:
                            self._commit(req, view[at:at + length], planner)
        result: torch.futures.Future[None] = torch.futures.Future()
        result.set_result(None)
        return result

    @staticmethod
    def _commit(req: Any, data: memoryview, planner: LoadPlanner) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(data))
            return
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise AssertionError(f"{req.storage_index}: checkpoint shape {tensor.size()} != model {target.size()}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)
