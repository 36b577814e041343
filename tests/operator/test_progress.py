"""progress.py: the trainer's /progress (served by global rank 0) and worker 0's final report → the job's
status.progress, status.checkpoint and status.checkpoints patch; which ended worker 0's report the controller
keeps for a reconcile that no longer sees the pod; the GET itself (fetch_progress) against real local HTTP
servers serving what a hostile pod could."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from kubetrain_api.contract import CHECKPOINT_CATALOGUE_MAX
from kubetrain_operator.pods import ObservedPod
from kubetrain_operator.progress import (
    MAX_PROGRESS_BYTES,
    catalogue,
    checkpoint_entry,
    fetch_progress,
    final_report_patch,
    gone_report_patch,
    progress_patch,
    readable,
    report_to_keep,
)
from support import http_server


def test_progress_patch_moves_step_time_only_when_the_step_changes() -> None:
    data = {"step": 5, "maxSteps": 10, "loss": float("inf"), "mfu": 0.5, "checkpoint": None, "phase": "training",
            "updatedAt": 100.0}
    first = progress_patch({}, data, 200.0)
    assert first["progress"]["step"] == 5 and "loss" not in first["progress"] and "checkpoint" not in first
    status = {"progress": first["progress"]}
    assert progress_patch(status, data, 300.0) == {}  # nothing new
    moved = progress_patch(status, {**data, "step": 6}, 400.0)
    assert moved["progress"]["step"] == 6 and moved["progress"]["stepTime"] == "1970-01-01T00:06:40.000Z"
    assert progress_patch({}, {"step": "x"}, 1.0) == {} and progress_patch({}, ["nope"], 1.0) == {}


def test_status_shows_numbers_a_person_can_read() -> None:
    data = {"step": 7, "maxSteps": 10, "loss": 8.596933841705322, "evalLoss": 0.000123456, "mfu": 0.41234567,
            "evalPerplexity": 1.0001234567, "tokensPerSecond": 2005.8081858554121, "etaSeconds": 12.5001}
    progress = progress_patch({}, data, 1.0)["progress"]
    assert (progress["loss"], progress["evalLoss"], progress["mfu"]) == (8.597, 0.0001235, 0.4123)
    assert progress["evalPerplexity"] == 1.0
    assert (progress["tokensPerSecond"], progress["etaSeconds"]) == (2006, 13)
    assert isinstance(progress["tokensPerSecond"], int) and readable("loss", None) is None


def test_a_final_report_only_moves_forward() -> None:
    status = {"progress": {"step": 60, "loss": 2.0}, "checkpoint": {"step": 60, "uri": "s3://b/60"}}
    older = {"step": 45, "loss": 3.0, "checkpoint": {"step": 45, "uri": "s3://b/45", "time": 5.0}}
    assert final_report_patch(status, older, 1.0) == {}  # an earlier run's worker 0: nothing goes back
    stale_checkpoint = {"step": 61, "loss": 1.9, "checkpoint": {"step": 45, "uri": "s3://b/45", "time": 5.0}}
    patch = final_report_patch(status, stale_checkpoint, 1.0)
    assert patch["progress"]["step"] == 61 and "checkpoint" not in patch
    assert final_report_patch(status, None, 1.0) == {} and final_report_patch({}, {"step": "x"}, 1.0) == {}


def entry(step: int) -> dict[str, object]:
    return {"step": step, "uri": f"s3://b/job/step-{step:09d}", "time": 1000.0 + step}


def test_the_catalogue_is_copied_oldest_first_one_per_step_short_and_only_when_the_trainer_sends_one() -> None:
    sent = [entry(20), "junk", {"step": -1}, entry(10), {**entry(20), "time": 5000.0}, {"step": 30}]
    assert catalogue(sent) == [{"step": 10, "uri": "s3://b/job/step-000000010", "time": "1970-01-01T00:16:50Z"},
                               {"step": 20, "uri": "s3://b/job/step-000000020", "time": "1970-01-01T01:23:20Z"},
                               {"step": 30}]
    assert [e["step"] for e in catalogue([entry(s) for s in range(50)]) or []] == list(
        range(50 - CHECKPOINT_CATALOGUE_MAX, 50))
    listed = progress_patch({}, {"step": 20, "checkpoints": [entry(10), entry(20)]}, 1.0)["checkpoints"]
    status = {"checkpoints": listed}
    assert "checkpoints" not in progress_patch(status, {"step": 21, "checkpoints": [entry(10), entry(20)]}, 2.0)
    # A trainer still starting (or an older one) sends none, or an empty list: status keeps what it lists.
    for data in ({"step": 0, "checkpoints": []}, {"step": 0}, {"step": 0, "checkpoints": {"step": 1}}):
        assert "checkpoints" not in progress_patch(status, data, 3.0)


def test_a_sigterm_report_moves_checkpoint_and_catalogue_forward_and_keeps_what_it_does_not_say() -> None:
    status = {"progress": {"step": 40, "maxSteps": 100, "evalLoss": 2.5, "evalPerplexity": 12.18, "phase": "training"},
              "checkpoint": {"step": 30}, "checkpoints": [{"step": 30}]}
    report = {"step": 45, "loss": 2.4, "checkpoint": entry(45), "checkpoints": [entry(30), entry(45)],
              "updatedAt": 1045.0}
    patch = final_report_patch(status, report, 1.0)
    assert patch["progress"]["step"] == 45 and patch["checkpoint"]["step"] == 45
    assert [e["step"] for e in patch["checkpoints"]] == [30, 45]
    assert not {"evalLoss", "evalPerplexity", "phase", "maxSteps"} & set(patch["progress"])  # not erased
    newer = {**status, "checkpoint": {"step": 50}, "checkpoints": [{"step": 50}]}
    stale = final_report_patch(newer, report, 1.0)  # the report's checkpoints are older than status lists
    assert stale["progress"]["step"] == 45 and "checkpoint" not in stale and "checkpoints" not in stale


def test_the_report_of_an_ended_worker_0_is_kept_until_a_reconcile_that_no_longer_sees_the_pod_applies_it() -> None:
    report = {"step": 45, "checkpoint": entry(45), "checkpoints": [entry(45)]}
    ended = ObservedPod(name="job-worker-0", index=0, uid="u0", phase="Failed", exit_code=143, report=report)
    assert report_to_keep(ended, "job") is ended
    for other in (None, replace(ended, report=None), replace(ended, index=1, name="job-worker-1"),
                  replace(ended, name="other-worker-0")):
        assert report_to_keep(other, "job") is None
    status = {"progress": {"step": 40}, "checkpoint": {"step": 30}}
    assert gone_report_patch(status, ended, [], 1.0)["checkpoint"]["step"] == 45
    assert gone_report_patch(status, ended, [ended], 1.0) == {}  # still observed: the planner reads it
    assert gone_report_patch(status, None, [], 1.0) == {}


@asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                  seen: list[str]) -> AsyncIterator[str]:
    """support.http_server.serving, as the URL to ask."""
    async with http_server.serving(handler, seen) as port:
        yield f"http://127.0.0.1:{port}"


async def fetched(url: str) -> dict[str, object] | None:
    async with aiohttp.ClientSession() as session:  # as the operator's Runtime makes it: aiohttp's defaults
        return await fetch_progress(session, url + "/progress", 2.0)


@pytest.mark.asyncio
async def test_a_progress_reply_is_read() -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"step": 3})

    async with serving(ok, []) as url:
        assert await fetched(url) == {"step": 3}


@pytest.mark.asyncio
async def test_a_redirect_is_not_followed() -> None:
    """A 302 would make the operator fetch any URL from its own network position."""
    elsewhere: list[str] = []

    async def secret(_: web.Request) -> web.Response:
        return web.json_response({"step": 1, "secret": "the cloud metadata service"})

    async with serving(secret, elsewhere) as target:
        async def redirect(_: web.Request) -> web.Response:
            raise web.HTTPFound(target + "/latest/meta-data/")

        async with serving(redirect, []) as url:
            assert await fetched(url) is None
    assert elsewhere == []


@pytest.mark.asyncio
@pytest.mark.parametrize("size", ["declared", "chunked"])
async def test_a_compressed_or_oversized_body_is_not_inflated_or_read(size: str) -> None:
    """A 1 MB gzip body inflates to 1 GB: a compressed reply is no answer, and at most MAX_PROGRESS_BYTES are read."""
    asked: list[str] = []
    bomb = gzip.compress(b'{"step": 1, "pad": "' + b" " * (64 * MAX_PROGRESS_BYTES) + b'"}')

    async def gzipped(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding", ""))
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async def huge(_: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if size == "declared":
            resp.content_length = 2 * MAX_PROGRESS_BYTES
        await resp.prepare(_)
        await resp.write(b'{"step": 1, "pad": "' + b" " * (2 * MAX_PROGRESS_BYTES - 22) + b'"}')
        return resp

    async with serving(gzipped, []) as url:
        assert await fetched(url) is None
    assert asked == ["identity"]
    async with serving(huge, []) as url:
        assert await fetched(url) is None


def test_a_checkpoint_uri_in_status_is_capped() -> None:
    entry = checkpoint_entry({"step": 1, "uri": "s3://b/" + "x" * 10_000})
    assert entry is not None and len(entry["uri"]) == 1024
    assert len(json.dumps(progress_patch({}, {"step": 1, "checkpoint": {"step": 1, "uri": "x" * 10**6}}, 0.0))) < 2000
