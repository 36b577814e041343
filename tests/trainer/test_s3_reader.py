"""kubetrain_trainer.s3_reader: a DCP load from S3 (moto_server) restores every byte with a few coalesced
ranged GETs, and the coalescing covers every read exactly once without crossing an object."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_api.config import S3Spec
from kubetrain_trainer.s3_reader import S3Reader, coalesce_reads, split_ranges
from kubetrain_trainer.s3_writer import S3Writer
from kubetrain_trainer.storage import S3Store
from support.s3 import MotoServer, incomplete_uploads


def test_dcp_round_trip_through_s3_coalesces_tensor_reads(s3: MotoServer, bucket: str, world_of_one: None) -> None:
    # 5 MiB parts, 10 MiB objects: 60 tensors (~25 MB) written back to back into 3 objects; the load
    # must restore every byte with a few GETs of up to a part each, not one GET per tensor.
    store = S3Store(f"s3://{bucket}/coalesce/", S3Spec.model_validate(s3.s3_section(maxConcurrency=4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(320, 320) for _ in range(30)])
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "extra": {"note": [1, 2, 3]}}
    total = sum(v.numel() * v.element_size() for v in state["model"].values())
    dcp.save(state, storage_writer=S3Writer(store, "ck"))
    assert incomplete_uploads(s3.client(), bucket) == []
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "extra": {"note": []}}
    reader = S3Reader(store, "ck", store.spec.object_size_bytes)
    dcp.load(target, storage_reader=reader)
    for key, value in state["model"].items():
        assert torch.equal(target["model"][key], value), key
    assert target["extra"] == {"note": [1, 2, 3]}
    most = -(-total // store.spec.part_size_bytes) + -(-total // store.spec.object_size_bytes) + 1
    assert 0 < reader.requests <= most < len(state["model"])


def test_coalesced_reads_cover_every_request_exactly_once() -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5000), st.integers(1, 900)), max_size=40),
           st.integers(1, 2000), st.integers(0, 50))
    def check(ranges: list[tuple[str, int, int]], limit: int, gap: int) -> None:
        requests = [(name, off, n, i) for i, (name, off, n) in enumerate(ranges)]
        groups = coalesce_reads(requests, limit, gap)
        seen = []
        for g in groups:
            assert g.length <= limit or len(g.items) == 1
            for item, at, n in g.items:
                name, off, length, _ = requests[item]
                assert (name, off, length) == (g.name, g.start + at, n) and at + n <= g.length
                seen.append(item)
        assert sorted(seen) == list(range(len(requests)))
        for g in groups:  # the GETs cover the group without crossing an object or exceeding the limit
            gets = split_ranges(g.start, g.length, 700, limit)
            assert sum(n for _, _, n in gets) == g.length
            assert all(0 < n <= limit and within + n <= 700 for _, within, n in gets)
            starts = [i * 700 + w for i, w, _ in gets]
            assert starts == [g.start + sum(n for _, _, n in gets[:k]) for k in range(len(gets))]

    check()
