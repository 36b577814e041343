"""kubetrain_trainer.storage: the stores checkpoints are kept in (S3Store on moto_server, LocalStore), their
exclusive put, which lets only one writer commit a checkpoint, and which storage errors at start are the
user's to fix (exit 2) and which may pass (exit 5)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubetrain_api.config import S3Spec
from kubetrain_api.exit_codes import EXIT_STORAGE_UNAVAILABLE
from kubetrain_trainer.errors import ConfigError, StorageUnavailableError
from kubetrain_trainer.shards import TokenShards
from kubetrain_trainer.storage import AlreadyExists, LocalStore, S3Store, local_copy
from support import free_port
from support.s3 import MotoServer


def test_store_exclusive_put_refuses_a_second_writer(s3: MotoServer, bucket: str, tmp_path: Path) -> None:
    for store in (S3Store(f"s3://{bucket}/excl/", S3Spec.model_validate(s3.s3_section())), LocalStore(tmp_path)):
        store.put("a/COMMITTED", b"first", exclusive=True)
        with pytest.raises(AlreadyExists):
            store.put("a/COMMITTED", b"second", exclusive=True)
        assert store.get("a/COMMITTED") == b"first"
        assert store.list("a/") == {"a/COMMITTED": 5}
        # Listing an object's own key finds it on both (how "is it there?" is asked), a missing key nothing.
        assert store.list("a/COMMITTED") == {"a/COMMITTED": 5}
        assert store.list("a/MISSING") == {}


class _Unavailable(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 SlowDown, as S3 does under load."""

    def _answer(self) -> None:
        body = b"<Error><Code>ServiceUnavailable</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def test_storage_errors_at_start_are_retryable_unless_the_users_to_fix(s3: MotoServer, bucket: str,
                                                                     tmp_path: Path) -> None:
    """start_error's line: a refused connection and 5xx after the retries → StorageUnavailableError (exit 5,
    restarted); no such bucket, no such key → ConfigError (exit 2), the field named. Through the trainer's
    own readers: the tokenizer download (local_copy) and remote shards' index."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        down = {"refused": f"http://127.0.0.1:{free_port()}", "503": f"http://127.0.0.1:{server.server_port}"}
        for name, endpoint in down.items():
            spec = S3Spec.model_validate(s3.s3_section(endpoint=endpoint, maxAttempts=2, timeoutSeconds=2))
            with pytest.raises(StorageUnavailableError, match=r"tokenizer\.path: cannot download s3://b/tok/") as exc:
                local_copy("s3://b/tok/", tmp_path / name, spec, "tokenizer.path")
            assert exc.value.exit_code == EXIT_STORAGE_UNAVAILABLE, name
            with pytest.raises(StorageUnavailableError, match=r"data\.train: cannot read s3://b/train/index\.json"):
                TokenShards("s3://b/train/", 16, "data.train", s3=spec)
    finally:
        server.shutdown()
    spec = S3Spec.model_validate(s3.s3_section(maxAttempts=2))
    with pytest.raises(ConfigError, match=r"tokenizer\.path: cannot download s3://no-such-bucket/tok/.*NoSuchBucket"):
        local_copy("s3://no-such-bucket/tok/", tmp_path / "nb", spec, "tokenizer.path")
    with pytest.raises(ConfigError, match=r"tokenizer\.path: cannot download .*nothing under"):
        local_copy(f"s3://{bucket}/no-tokenizer/", tmp_path / "nk", spec, "tokenizer.path")
    with pytest.raises(ConfigError, match=r"data\.train: cannot read .*NoSuchKey.*kubetrain prepare --output"):
        TokenShards(f"s3://{bucket}/no-shards/", 16, "data.train", s3=spec)
