"""Saving a DCP checkpoint to S3: `S3Writer`, DCP's FileSystemWriter over `S3FileSystem`.

Each rank's file streams from memory into S3 multipart uploads (`MultipartStream`: parts uploaded
concurrently, at most `max_concurrency` parts buffered), split into objects `name.00000`,
`name.00001`, ... of at most `object_size_bytes`. s3_reader.py reads them back; `S3FileSystem` is
what both DCP classes go through (object naming, listing, the small metadata reads).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import os
import re
import threading
import zlib
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemWriter

from .staging import CachedStaging
from .storage import S3Store

log = logging.getLogger(__name__)


def object_key(name: str, index: int) -> str:
    return f"{name}.{index:05d}"


def crc32_b64(data: Any) -> str:
    """CRC32 as S3 writes it (`x-amz-checksum-crc32`): base64 of the 4 big-endian bytes."""
    return b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class MultipartStream(io.RawIOBase):
    """A write-only stream that uploads as it goes. The bytes written become objects `name.00000`,
    `name.00001`, ... of `object_size` bytes (the last shorter); each object is a multipart upload
    whose parts are sent concurrently by the shared pool while later parts are still being written.

    Bytes are copied once, into part-sized buffers that go back to the file system's free list when
    their part is uploaded. An object's completion (waiting for its parts, then
    CompleteMultipartUpload) runs on the completion pool, so the next object starts at once instead
    of draining the upload pipeline at every object boundary."""

    def __init__(self, fs: S3FileSystem, name: str):
        super().__init__()
        self.fs, self.name = fs, name
        self.part_size, self.object_size = fs.spec.part_size_bytes, fs.spec.object_size_bytes
        self._buf: bytearray | None = None
        self._fill = 0  # bytes of _buf written so far
        self._pos = 0
        self._object = 0
        self._object_bytes = 0  # bytes of the current object handed to parts so far
        self._upload_id: str | None = None
        self._parts: list[cf.Future] = []
        self._pending: list[tuple[str, str, cf.Future]] = []  # (key, upload id, completion) per object
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
        # numpy copies 5x faster than bytearray slice assignment here, and without holding the GIL, so the
        # part uploads keep running while a tensor is copied.
        src = np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8)
        n, at = len(src), 0
        while at < n:
            if self._buf is None:
                self._buf = self.fs.take_buffer()
            room = min(self.part_size - self._fill, self.object_size - self._object_bytes - self._fill, n - at)
            np.copyto(np.frombuffer(self._buf, dtype=np.uint8)[self._fill:self._fill + room], src[at:at + room])
            self._fill += room
            at += room
            if self._fill == self.part_size:
                self._send_part()
            if self._object_bytes == self.object_size:
                self._finish_object()
        self._pos += n
        return n

    def _key(self) -> str:
        return self.fs.store.key(object_key(self.name, self._object))

    def _raise_failed(self) -> None:
        """Stop early instead of streaming into an upload that already failed."""
        for future in [*self._parts, *(c for _, _, c in self._pending)]:
            if future.done() and future.exception() is not None:
                raise cast(BaseException, future.exception())

    def _take_data(self) -> tuple[bytes | bytearray, bytearray | None]:
        """The filled bytes to send, and the buffer to recycle after sending (None: nothing to recycle)."""
        buf, fill = self._buf, self._fill
        assert buf is not None
        self._buf, self._fill = None, 0
        if fill == len(buf):
            return buf, buf  # a full part: sent as is, no copy
        data = bytes(memoryview(buf)[:fill])  # the last, short part of an object
        self.fs.give_buffer(buf)
        return data, None

    def _send_part(self) -> None:
        s3, bucket = self.fs.store.client, self.fs.store.bucket
        if self._upload_id is None:
            key = self._key()
            # CRC32 declared up front, as boto3's TransferManager does: S3 then verifies every part against
            # its CRC32 and the whole object against their composite at completion. (Declaring none makes S3
            # compute a full-object CRC64NVME on completion: another pass over every byte server-side.)
            self._upload_id = self.fs.store._retry(
                lambda: s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")["UploadId"],
                f"start upload {key}")
        self._raise_failed()
        data, recycle = self._take_data()
        number, key, upload_id = len(self._parts) + 1, self._key(), self._upload_id
        self._object_bytes += len(data)
        self.fs.slots.acquire()  # back-pressure: at most max_concurrency parts buffered per process

        def upload() -> dict[str, Any]:
            try:
                crc = crc32_b64(data)  # computed once, here (zlib releases the GIL); botocore then skips its own
                etag = self.fs.store._retry(lambda: s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                                                   PartNumber=number, Body=data,
                                                                   ChecksumCRC32=crc)["ETag"],
                                            f"upload part {number} of {key}")
                self.fs.count(len(data))
                return {"PartNumber": number, "ETag": etag, "ChecksumCRC32": crc}
            finally:
                if recycle is not None:
                    self.fs.give_buffer(recycle)
                self.fs.slots.release()

        self._parts.append(self.fs.pool.submit(upload))

    def _finish_object(self) -> None:
        s3, bucket, key = self.fs.store.client, self.fs.store.bucket, self._key()
        if self._upload_id is None:  # small object: one PUT
            data = b""
            if self._buf is not None:
                data = bytes(memoryview(self._buf)[:self._fill])
                self.fs.give_buffer(self._buf)
                self._buf, self._fill = None, 0
            crc = crc32_b64(data)
            self.fs.store._retry(lambda: s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumCRC32=crc),
                                 f"put {key}")
            self.fs.count(len(data))
        else:
            if self._fill:
                self._send_part()
            parts, upload_id, retry = list(self._parts), self._upload_id, self.fs.store._retry

            def complete() -> None:
                done = [f.result() for f in parts]
                retry(lambda: s3.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}), f"complete {key}")

            self._pending.append((key, upload_id, self.fs.completer.submit(complete)))
        self._object += 1
        self._object_bytes = 0
        self._upload_id = None
        self._parts = []

    def close(self) -> None:
        if not self.closed:
            if self._fill or self._object_bytes or self._pos == 0:
                self._finish_object()
            for _, _, completion in self._pending:
                completion.result()  # the first failure is raised; the caller then aborts the rest
            if self._buf is not None:
                self.fs.give_buffer(self._buf)
                self._buf = None
            super().close()

    def abort(self) -> None:
        for f in self._parts:
            if f.cancel():  # never ran, so its finally clause will not return the slot: return it here
                self.fs.slots.release()
        cf.wait([*self._parts, *(c for _, _, c in self._pending)])
        uploads = [(key, upload_id) for key, upload_id, c in self._pending if c.exception() is not None]
        if self._upload_id is not None:
            uploads.append((self._key(), self._upload_id))
        s3, bucket = self.fs.store.client, self.fs.store.bucket
        for key, upload_id in uploads:
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # the store may be down; a restart aborts leftovers (abort_uploads)
                log.warning("could not abort the upload of %s (%s)", key, type(exc).__name__)
        self._buf = None
        super().close()


class S3FileSystem(FileSystemBase):
    """The FileSystemBase DCP writes through; paths are keys relative to the store's prefix."""

    def __init__(self, store: S3Store):
        self.store = store
        self.spec = store.spec
        self.pool = cf.ThreadPoolExecutor(max_workers=self.spec.max_concurrency, thread_name_prefix="s3-part")
        # Completions only wait and send one small request each; two keep up with any part rate.
        self.completer = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="s3-complete")
        self.slots = threading.BoundedSemaphore(self.spec.max_concurrency)
        self._free: list[bytearray] = []  # part buffers, reused: at most max_concurrency + 1 exist
        self._lock = threading.Lock()
        self.bytes_written = 0

    def take_buffer(self) -> bytearray:
        with self._lock:
            return self._free.pop() if self._free else bytearray(self.spec.part_size_bytes)

    def give_buffer(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_written += n

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        key = str(path)
        if mode == "wb":
            stream = MultipartStream(self, key)
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


class S3Writer(CachedStaging, FileSystemWriter):
    """FileSystemWriter (planning, staging for async saves, metadata) over S3FileSystem."""

    # One DCP writer thread: its extra threads (thread_count > 1) lose their exceptions, so a failed
    # file could go unreported. Parallelism comes from the concurrent part uploads instead.
    def __init__(self, store: S3Store, step_key: str, thread_count: int = 1):
        super().__init__(step_key, sync_files=False, thread_count=thread_count, cache_staged_state_dict=True)
        self.fs = S3FileSystem(store)  # type: ignore[assignment]
        self.path = self.fs.init_path(step_key)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)

    def write_data(self, plan: Any, planner: Any) -> Any:
        # torch.save's zip CRC32 runs byte by byte on this one writer thread (~0.7 GB/s, about half of the
        # serialisation time) and nothing checks it on load; S3 checksums every part (CRC32, verified by
        # the server) instead. The option is process-wide: nothing else calls torch.save during a save.
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            return super().write_data(plan, planner)  # synchronous: the files are written when it returns
        finally:
            torch.serialization.set_crc32_options(crc)
