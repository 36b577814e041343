"""kubetrain_trainer.s3_writer: DCP's stream written to S3 (moto_server) as objects of a fixed size, each a
multipart upload whose parts carry their CRC32, and a failed stream leaving no upload behind."""

from __future__ import annotations

import os
from typing import Any

import pytest
from kubetrain_api.config import S3Spec
from kubetrain_trainer.s3_reader import split_ranges
from kubetrain_trainer.s3_writer import S3FileSystem, crc32_b64, object_key
from kubetrain_trainer.storage import S3Store
from support.s3 import MotoServer, incomplete_uploads


def test_streaming_upload_splits_objects_and_ranged_reads_return_the_bytes(s3: MotoServer, bucket: str) -> None:
    store = S3Store(f"s3://{bucket}/stream/", S3Spec.model_validate(s3.s3_section(maxConcurrency=3)))
    fs = S3FileSystem(store)
    payload = os.urandom(23 * 2**20 + 12345)
    # What the client really sends: every multipart upload declares CRC32 and every part carries the CRC32
    # of exactly its bytes (real S3 rejects a part whose bytes do not match; moto does not check).
    sent: list[tuple[str, Any]] = []
    store.client.meta.events.register("provide-client-params.s3.CreateMultipartUpload",
                                      lambda params, **_: sent.append(("create", params.get("ChecksumAlgorithm"))))
    store.client.meta.events.register("provide-client-params.s3.UploadPart", lambda params, **_: sent.append(
        ("part", params.get("ChecksumCRC32") == crc32_b64(params["Body"]) and len(params["Body"]))))
    store.client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: sent.append(
        ("put", params.get("ChecksumCRC32") == crc32_b64(params["Body"]) and len(params["Body"]))))
    with fs.create_stream("ckpt/__0_0.distcp", "wb") as stream:
        pos = 0
        for size in (1, 3 * 2**20, 7 * 2**20 + 5, 2**20, len(payload)):  # uneven writes
            stream.write(payload[pos : pos + size])
            pos = min(len(payload), pos + size)
        assert stream.tell() == len(payload)
    sizes = store.list("ckpt/")
    assert sizes == {"ckpt/__0_0.distcp.00000": 10 * 2**20, "ckpt/__0_0.distcp.00001": 10 * 2**20,
                     "ckpt/__0_0.distcp.00002": len(payload) - 20 * 2**20}
    assert fs.bytes_written == len(payload)
    for start, length in ((0, 10), (10 * 2**20 - 3, 7), (5, 21 * 2**20), (len(payload) - 100, 100)):
        gets = split_ranges(start, length, 10 * 2**20, 4 * 2**20)
        got = b"".join(store.get_range(object_key("ckpt/__0_0.distcp", i), within, n) for i, within, n in gets)
        assert got == payload[start : start + length]
    assert incomplete_uploads(s3.client(), bucket) == []
    # two 10 MiB objects of two 5 MiB parts each; the last object, shorter than a part, is one PUT
    assert [x for x in sent if x[0] != "part"] == [("create", "CRC32")] * 2 + [("put", 3 * 2**20 + 12345)]
    assert [x for x in sent if x[0] == "part"] == [("part", 5 * 2**20)] * 4
    assert crc32_b64(b"123456789") == "y/Q5Jg=="  # the CRC-32 check value 0xCBF43926, as S3 encodes it


def test_failed_stream_aborts_its_multipart_upload(s3: MotoServer, bucket: str) -> None:
    store = S3Store(f"s3://{bucket}/abort/", S3Spec.model_validate(s3.s3_section()))
    fs = S3FileSystem(store)
    with pytest.raises(RuntimeError, match="serialisation failed"), fs.create_stream("x/__0_0.distcp", "wb") as stream:
        stream.write(os.urandom(7 * 2**20))  # one part sent: the upload exists
        assert incomplete_uploads(s3.client(), bucket)
        raise RuntimeError("serialisation failed")
    assert incomplete_uploads(s3.client(), bucket) == []
    assert store.list("x/") == {}
