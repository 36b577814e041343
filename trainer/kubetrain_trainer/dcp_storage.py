"""torch.distributed.checkpoint (DCP) storage on S3 and on local disk.

`S3FileSystem` plugs into DCP's FileSystemWriter: each rank's file streams from memory into S3
multipart uploads (parts uploaded concurrently, at most `max_concurrency` parts buffered), split into
objects of at most `object_size_bytes`. `S3Reader` loads with parallel ranged GETs of exactly the
bytes each rank needs, so nothing is copied locally. Both writers stage into host buffers allocated
once and reused by every save.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from .storage import S3Store

log = logging.getLogger(__name__)

def object_key(name: str, index: int) -> str:
    return f"{name}.{index:05d}"


class _MultipartStream(io.RawIOBase):
    """A write-only stream that uploads as it goes. The bytes written become objects `name.00000`,
    `name.00001`, ... of `object_size` bytes (the last shorter); each object is a multipart upload
    whose parts are sent concurrently by the shared pool while later parts are still being written."""

    def __init__(self, fs: S3FileSystem, name: str):
        super().__init__()
        self.fs, self.name = fs, name
        self.part_size, self.object_size = fs.spec.part_size_bytes, fs.spec.object_size_bytes
        self._buf = bytearray()
        self._pos = 0
        self._object = 0
        self._object_bytes = 0  # bytes of the current object handed to parts so far
        self._upload_id: str | None = None
        self._parts: list[cf.Future] = []
        self.error: Exception | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def write(self, b: Any) -> int:
        try:
            return self._write(b)
        except Exception as exc:  # remembered: torch.save reports a later, meaningless error instead
            self.error = self.error or exc
            raise

    def _write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        while len(view):
            room = min(self.part_size - len(self._buf), self.object_size - self._object_bytes - len(self._buf))
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) == self.part_size:
                self._send_part()
            if self._object_bytes == self.object_size:
                self._finish_object()
        self._pos += n
        return n

    def _key(self) -> str:
        return self.fs.store.key(object_key(self.name, self._object))

    def _send_part(self) -> None:
        s3, bucket = self.fs.store.client, self.fs.store.bucket
        if self._upload_id is None:
            key = self._key()
            self._upload_id = self.fs.store._retry(
                lambda: s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"], f"start upload {key}")
        for part in self._parts:  # stop early instead of streaming into an upload that already failed
            if part.done() and part.exception() is not None:
                raise cast(BaseException, part.exception())
        data, number, key, upload_id = bytes(self._buf), len(self._parts) + 1, self._key(), self._upload_id
        self._buf.clear()
        self._object_bytes += len(data)
        self.fs.slots.acquire()  # back-pressure: at most max_concurrency parts buffered per process

        def upload() -> dict[str, Any]:
            try:
                etag = self.fs.store._retry(lambda: s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                                                   PartNumber=number, Body=data)["ETag"],
                                            f"upload part {number} of {key}")
                self.fs.count(len(data))
                return {"PartNumber": number, "ETag": etag}
            finally:
                self.fs.slots.release()

        self._parts.append(self.fs.pool.submit(upload))

    def _finish_object(self) -> None:
        s3, bucket, key = self.fs.store.client, self.fs.store.bucket, self._key()
        if self._upload_id is None:  # small object: one PUT
            data = bytes(self._buf)
            self._buf.clear()
            self.fs.store._retry(lambda: s3.put_object(Bucket=bucket, Key=key, Body=data), f"put {key}")
            self.fs.count(len(data))
        else:
            if self._buf:
                self._send_part()
            parts = [f.result() for f in self._parts]
            upload_id = self._upload_id
            self.fs.store._retry(lambda: s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}), f"complete {key}")
        self._object += 1
        self._object_bytes = 0
        self._upload_id = None
        self._parts = []

    def close(self) -> None:
        if not self.closed:
            if self._buf or self._object_bytes or self._pos == 0:
                self._finish_object()
            super().close()

    def abort(self) -> None:
        for f in self._parts:
            if f.cancel():  # never ran, so its finally clause will not return the slot: return it here
                self.fs.slots.release()
        cf.wait(self._parts)
        if self._upload_id is not None:
            s3, bucket, key, upload_id = self.fs.store.client, self.fs.store.bucket, self._key(), self._upload_id
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # the store may be down; a restart aborts leftovers (abort_uploads)
                log.warning("could not abort the upload of %s (%s)", key, type(exc).__name__)
        super().close()


class S3FileSystem(FileSystemBase):
    """The FileSystemBase DCP writes through; paths are keys relative to the store's prefix."""

    def __init__(self, store: S3Store):
        self.store = store
        self.spec = store.spec
        self.pool = cf.ThreadPoolExecutor(max_workers=self.spec.max_concurrency, thread_name_prefix="s3-part")
        self.slots = threading.BoundedSemaphore(self.spec.max_concurrency)
        self._lock = threading.Lock()
        self.bytes_written = 0

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_written += n

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        key = str(path)
        if mode == "wb":
            stream = _MultipartStream(self, key)
            try:
                yield stream
                stream.close()
            except BaseException as exc:
                stream.abort()
                if stream.error is not None and stream.error is not exc:
                    raise stream.error from exc  # the storage error, not torch.save's symptom of it
                raise
        else:  # whole small objects only (.metadata); tensors are read by S3Reader with ranged GETs
            yield io.BytesIO(self.read_file(key))

    def objects(self, name: str) -> list[str]:
        """The objects a logical file was split into, in order (name.00000, name.00001, ...)."""
        pattern = re.compile(re.escape(name) + r"\.\d{5}$")
        return sorted(k for k in self.store.list(name + ".") if pattern.match(k))

    def read_file(self, key: str) -> bytes:
        return b"".join(self.store.get(k) for k in self.objects(key))

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}" if str(path) else suffix

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        """Only DCP's .metadata goes through here: copy its objects to the new name, delete the old."""
        s3, bucket = self.store.client, self.store.bucket
        for key in self.objects(str(path)):
            index = key.rsplit(".", 1)[-1]
            src, dst = self.store.key(key), self.store.key(f"{new_path}.{index}")
            copy = partial(s3.copy_object, Bucket=bucket, Key=dst, CopySource={"Bucket": bucket, "Key": src})
            self.store._retry(copy,
                              f"copy {key}")
            self.store._retry(partial(s3.delete_object, Bucket=bucket, Key=src), f"delete {key}")

    def init_path(self, path: str | os.PathLike) -> str:
        return str(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        pass  # object stores have no directories

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return bool(self.objects(str(path)))

    def rm_file(self, path: str | os.PathLike) -> None:
        for key in self.objects(str(path)):
            self.store.delete_prefix(key)


class _CachedStaging:
    """Stage into host buffers allocated once and reused by every save (pinned only where a GPU is)."""

    state_dict_cache: Any = None

    def stage(self, state_dict: Any) -> Any:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self.state_dict_cache is None:
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self.state_dict_cache)


class S3Writer(_CachedStaging, FileSystemWriter):
    """FileSystemWriter (planning, staging for async saves, metadata) over S3FileSystem."""

    # One DCP writer thread: its extra threads (thread_count > 1) lose their exceptions, so a failed
    # file could go unreported. Parallelism comes from the concurrent part uploads instead.
    def __init__(self, store: S3Store, step_key: str, thread_count: int = 1):
        super().__init__(step_key, sync_files=False, thread_count=thread_count, cache_staged_state_dict=True)
        self.fs = S3FileSystem(store)  # type: ignore[assignment]
        self.path = self.fs.init_path(step_key)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)


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


class LocalWriter(_CachedStaging, FileSystemWriter):
    def __init__(self, path: str, thread_count: int = 1):
        super().__init__(path, sync_files=True, thread_count=thread_count, cache_staged_state_dict=True)
        self.fs = CountingFileSystem()


class S3Reader(FileSystemReader):
    """Loads exactly the byte ranges this rank's plan needs, `max_concurrency` ranged GETs at a time."""

    def __init__(self, store: S3Store, step_key: str, object_size: int):
        super().__init__(step_key)
        self.store = store
        self.object_size = object_size
        self.fs = S3FileSystem(store)  # type: ignore[assignment]
        self.path = step_key

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = str(checkpoint_id)

    def _read(self, name: str, offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            index, within = divmod(offset, self.object_size)
            take = min(length, self.object_size - within)
            out += self.store.get_range(object_key(f"{self.path}/{name}", index), within, take)
            offset, length = offset + take, length - take
        return bytes(out)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        # Requests are fetched concurrently; tensors are committed one at a time in this thread.
        window = max(1, self.store.spec.max_concurrency)
        items = list(plan.items)
        with cf.ThreadPoolExecutor(max_workers=window, thread_name_prefix="s3-read") as pool:
            pending: dict[cf.Future, Any] = {}
            position = 0
            while position < len(items) or pending:
                while position < len(items) and len(pending) < 2 * window:  # bounded read-ahead
                    req = items[position]
                    info = self.storage_data[req.storage_index]
                    pending[pool.submit(self._read, info.relative_path, info.offset, info.length)] = req
                    position += 1
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    req = pending.pop(fut)
                    self._commit(req, fut.result(), planner)
        result: torch.futures.Future[None] = torch.futures.Future()
        result.set_result(None)
        return result

    @staticmethod
    def _commit(req: Any, data: bytes, planner: LoadPlanner) -> None:
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


