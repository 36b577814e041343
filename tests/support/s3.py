"""A real S3 endpoint for tests: `moto_server` on loopback, one per test module (it keeps objects in
memory and does not give memory back), with its temporary files under the test's own directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from support import free_port, stop_process

# Distinctive so that a test can prove it never leaks into output, logs, metrics or events.
SECRET = "kubetrain-test-secret-7f3a9c1e55"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetrain-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    """moto_server on loopback, its temporary files (objects over ~5 MiB) under `workdir`."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1"):
        """`host`: the address to bind (the test bed's bridge address, for pods of the local node)."""
        self.workdir, self.host = workdir, host
        self.port = free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None
        # The venv's own server (the moto version constraints.txt pins), not whatever else is on PATH.
        own = Path(sys.executable).parent / "moto_server"
        self.exe = str(own) if own.exists() else shutil.which("moto_server") or "moto_server"

    def start(self) -> None:
        exe = self.exe
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "moto.log").open("ab")
        self.proc = subprocess.Popen([exe, "-H", self.host, "-p", str(self.port)], stdout=log, stderr=log,
                                     env={**os.environ, "TMPDIR": str(tmp)})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc)

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=SECRET,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def s3_section(self, **extra: Any) -> dict[str, Any]:
        """The manifest's s3 section: small parts and objects so that multipart and splitting happen."""
        return {"endpoint": self.endpoint, "region": "us-east-1", "addressingStyle": "path",
                "partSizeBytes": 5 * 2**20, "objectSizeBytes": 10 * 2**20, "maxAttempts": 4,
                "timeoutSeconds": 10, **extra}


def objects(client: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def incomplete_uploads(client: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
