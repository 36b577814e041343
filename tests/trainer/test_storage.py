"""kubetrain_trainer.storage: the stores checkpoints are kept in (S3Store on moto_server, LocalStore) and
their exclusive put, which lets only one writer commit a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetrain_api.config import S3Spec
from kubetrain_trainer.storage import AlreadyExists, LocalStore, S3Store
from support.s3 import MotoServer


def test_store_exclusive_put_refuses_a_second_writer(s3: MotoServer, bucket: str, tmp_path: Path) -> None:
    for store in (S3Store(f"s3://{bucket}/excl/", S3Spec.model_validate(s3.s3_section())), LocalStore(tmp_path)):
        store.put("a/COMMITTED", b"first", exclusive=True)
        with pytest.raises(AlreadyExists):
            store.put("a/COMMITTED", b"second", exclusive=True)
        assert store.get("a/COMMITTED") == b"first"
        assert store.list("a/") == {"a/COMMITTED": 5}
