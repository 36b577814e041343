"""Object storage for checkpoints, data and exports: a local directory or an S3 bucket, one interface.

`Store` is the small key/value surface the checkpoint manager needs (list, get, ranged get,
exclusive put, delete, abort uploads); s3_writer.py and s3_reader.py stream checkpoints through it.
Every S3 request is retried on transient errors with exponential backoff and full jitter.
Credentials are read by boto3 from its usual chain and never logged.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from kubetrain_api.config import S3Spec

from .errors import ConfigError, StorageUnavailableError, TrainerError

log = logging.getLogger(__name__)
T = TypeVar("T")


class AlreadyExists(Exception):
    """An exclusive write found the key taken (another writer committed first)."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b → ("bucket", "a/b/"): the prefix always ends with / (or is empty)."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def s3_client(spec: S3Spec) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=spec.region,
        connect_timeout=spec.timeout_seconds,
        read_timeout=spec.timeout_seconds,
        retries={"mode": "standard", "max_attempts": 1},  # our own retry loop (with_retries) is the policy
        s3={"addressing_style": spec.addressing_style},
        max_pool_connections=max(16, 2 * spec.max_concurrency),
    )
    return boto3.session.Session().client("s3", endpoint_url=spec.endpoint, config=config)


def _transient(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or code in ("RequestTimeout", "SlowDown", "InternalError")
    return isinstance(exc, BotoCoreError | ConnectionError | TimeoutError)


# Error codes S3 answers for credentials that are there but expired: a refreshed token (IRSA, an instance
# profile) may fix them by the next start, so they are not the user's to fix.
_EXPIRED_CREDENTIALS = ("ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired")


def start_error(message: str, exc: BaseException, fix: str = "") -> TrainerError:
    """The error a run stops with when storage fails before training starts: `message` names the field,
    `fix` (for the user's errors) says what to do.

    Where the line is: what S3 answers about the request itself (no such bucket or key, access denied, a bad
    key id or signature: a 4xx) and what is not there or not readable as expected (a missing object, a
    malformed index) the user must fix: ConfigError, exit 2, never retried. What may pass (5xx and throttling
    after the retries, a refused connection, a timeout, DNS, credentials not there yet, e.g. a late IRSA
    token, or expired ones) is StorageUnavailableError, exit 5, which the operator restarts."""
    from botocore.exceptions import ClientError

    detail = f"{message} ({type(exc).__name__}: {str(exc)[:200]})"
    expired = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _EXPIRED_CREDENTIALS
    if expired or _transient(exc) or isinstance(exc, socket.gaierror):
        return StorageUnavailableError(f"{detail}; storage is unavailable for now; retrying later may succeed "
                                       f"(the operator restarts the job)")
    return ConfigError(f"{detail}; {fix}" if fix else detail)


def with_retries(fn: Callable[[], T], attempts: int, what: str, base: float = 0.25, cap: float = 8.0) -> T:
    """Call fn, retrying transient S3/network errors with exponential backoff and full jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not _transient(exc):
                raise
            delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
            log.warning("%s failed (%s), retry %d/%d in %.2fs", what, type(exc).__name__, attempt, attempts - 1,
                        delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# The key/value surface


class Store(ABC):
    """Keys are '/'-separated paths relative to the store's root."""

    uri: str

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:  # key → size
        ...

    @abstractmethod
    def checksums(self, prefix: str = "") -> dict[str, str]:
        """key → a fingerprint of the object's content, as recorded in a checkpoint's manifest."""
        ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        ...

    @abstractmethod
    def put(self, key: str, data: bytes, exclusive: bool = False) -> None:
        ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        ...

    def abort_uploads(self, prefix: str = "") -> int:
        return 0

    def child_uri(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + key


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self.root / prefix if prefix else self.root
        if base.is_file():  # an object's own key, as an S3 prefix listing finds it
            return {prefix: base.stat().st_size}
        if not base.exists():
            return {}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def checksums(self, prefix: str = "") -> dict[str, str]:
        """CRC32 of every file: one read of each (a local checkpoint is on this machine's disk)."""
        out = {}
        for key in self.list(prefix):
            crc = 0
            with (self.root / key).open("rb") as fh:
                while chunk := fh.read(8 << 20):
                    crc = zlib.crc32(chunk, crc)
            out[key] = f"crc32:{crc:08x}"
        return out

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes, exclusive: bool = False) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            if exclusive:
                os.link(tmp, path)  # atomic and fails if the name exists: the local If-None-Match
            else:
                os.replace(tmp, path)
        except FileExistsError as exc:
            raise AlreadyExists(key) from exc
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete_prefix(self, prefix: str) -> None:
        import shutil

        target = self.root / prefix
        if target.is_dir():
            def gone_already(func: Any, path: str, info: Any) -> None:
                if not isinstance(info[1], FileNotFoundError):  # a concurrent delete is fine; nothing else is
                    raise info[1]

            shutil.rmtree(target, onerror=gone_already)
        elif target.exists():
            target.unlink(missing_ok=True)


class S3Store(Store):
    def __init__(self, uri: str, spec: S3Spec, client: Any = None):
        self.uri = uri
        self.spec = spec
        self.bucket, self.prefix = split_s3_uri(uri)
        self.client = client or s3_client(spec)

    def key(self, key: str) -> str:
        return self.prefix + key

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, self.spec.max_attempts, what)

    def list(self, prefix: str = "") -> dict[str, int]:
        return {key: obj["Size"] for key, obj in self._list_objects(prefix).items()}

    def checksums(self, prefix: str = "") -> dict[str, str]:
        """The ETag S3 computed from the bytes it stored (an MD5, or for a multipart object the MD5 of its
        parts' MD5s and the part count): in every listing, so verifying a checkpoint costs no request per
        object. S3 itself verified each part's CRC32 (computed by the writer from the staged bytes) on
        upload and the composite of them on completion."""
        return {key: "etag:" + obj["ETag"].strip('"') for key, obj in self._list_objects(prefix).items()}

    def _list_objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key(prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._retry(partial(self.client.list_objects_v2, **kwargs), f"list {prefix}")
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix):]] = obj
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def get(self, key: str) -> bytes:
        return self._retry(lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"].read(),
                           f"get {key}")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        def fetch() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(key),
                                          Range=f"bytes={start}-{start + length - 1}")
            return cast(bytes, resp["Body"].read())

        return self._retry(fetch, f"get {key}[{start}:+{length}]")

    def put(self, key: str, data: bytes, exclusive: bool = False) -> None:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self._retry(lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data, **extra),
                        f"put {key}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AlreadyExists(key) from exc
            raise

    def delete_prefix(self, prefix: str) -> None:
        keys = list(self.list(prefix))
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self.key(k)} for k in keys[i : i + 1000]]
            self._retry(partial(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}),
                        f"delete {prefix}")

    def abort_uploads(self, prefix: str = "") -> int:
        """Abort incomplete multipart uploads under prefix (a writer that died cannot abort its own); only
        those under this store's own prefix, every page of the listing (S3 lists 1000 at a time)."""
        uploads: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:
            page = self._retry(partial(self.client.list_multipart_uploads, Bucket=self.bucket,
                                       Prefix=self.key(prefix), **markers), "list uploads")
            uploads += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        for up in uploads:
            self._retry(partial(self.client.abort_multipart_upload, Bucket=self.bucket, Key=up["Key"],
                                UploadId=up["UploadId"]), "abort upload")
        return len(uploads)

    def upload_tree(self, local: Path, key_prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Upload a local directory (e.g. the exported model) with boto3's transfer manager; file names in
        `skip` are left out."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_chunksize=self.spec.part_size_bytes, max_concurrency=self.spec.max_concurrency)
        for path in sorted(local.rglob("*")):
            if path.is_file() and path.name not in skip:
                key = self.key(key_prefix + str(path.relative_to(local)))
                self._retry(partial(self.client.upload_file, str(path), self.bucket, key, Config=cfg),
                            f"upload {path.name}")


def fetch_tree(uri: str, local: Path, spec: S3Spec) -> Path:
    """Download every object under an s3:// prefix into `local` (small trees: tokenizers, configs)."""
    store = S3Store(uri, spec)
    keys = store.list("")
    if not keys:
        raise FileNotFoundError(f"nothing under {uri}")
    for key in keys:
        target = local / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(key))
    return local


def local_copy(path: str, cache: Path, spec: S3Spec, field_name: str) -> str:
    """A local path for `path`, downloading an s3:// prefix (a tokenizer, say) into `cache` first."""
    if not path.startswith("s3://"):
        return path
    try:
        return str(fetch_tree(path, cache, spec))
    except Exception as exc:
        raise start_error(f"{field_name}: cannot download {path}", exc) from exc


def open_store(uri: str, spec: S3Spec) -> Store:
    if uri.startswith("s3://"):
        return S3Store(uri, spec)
    return LocalStore(uri.removeprefix("file://"))


def put_tree(store: Store, local: Path, key_prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Every file under `local` into `store` under `key_prefix` (file names in `skip` left out): S3's transfer
    manager for an S3Store, a copy, fsync and rename per file for a LocalStore."""
    if isinstance(store, S3Store):
        store.upload_tree(local, key_prefix, skip)
        return
    import shutil

    for path in sorted(Path(local).rglob("*")):
        if not path.is_file() or path.name in skip:
            continue
        target = Path(store.uri) / (key_prefix + str(path.relative_to(local)))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(path, tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
