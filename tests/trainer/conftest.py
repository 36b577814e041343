"""Fixtures of the trainer tests: a real S3 endpoint (moto_server on loopback, one per test module) with the
tests' bucket, and a one-process gloo group for the DCP saves and loads that run in the test process."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch.distributed as dist
from support.s3 import CREDENTIALS, MotoServer

TEST_BUCKET = "kubetrain-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """moto_server with the `bucket`, and its credentials in os.environ for the module's tests."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    server.client().create_bucket(Bucket=TEST_BUCKET)
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(s3: MotoServer) -> str:
    """The name of the bucket that the `s3` fixture creates."""
    return TEST_BUCKET


@pytest.fixture(scope="module")
def world_of_one() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
