"""kube.py's timeouts: a call to an API server that accepts the connection and never answers (a half-open
connection, a stuck proxy) fails with KubeError within the client's bound instead of hanging its caller,
and /healthz's rule (runner.api_healthy) turns unhealthy once the server has been silent for too long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from kubernetes_asyncio import client
from kubetrain_operator.kube import Kube, KubeError
from kubetrain_operator.runner import api_healthy


@pytest_asyncio.fixture
async def silent_server() -> AsyncIterator[str]:
    """A real TCP endpoint that accepts connections, reads what it is sent and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()


@pytest.mark.asyncio
async def test_a_call_to_a_server_that_never_answers_fails_within_the_request_timeout(silent_server: str) -> None:
    cfg = client.Configuration(host=silent_server)
    kube = Kube(client.ApiClient(cfg), request_timeout=0.3)
    answered = kube.last_answer
    try:
        # The outer bound only keeps a regression from hanging the test run; the call must fail by itself.
        with pytest.raises(KubeError) as raised:
            await asyncio.wait_for(kube.read_lease("ns", "lease"), timeout=20)
        with pytest.raises(KubeError):
            await asyncio.wait_for(kube.ping(), timeout=20)
    finally:
        await kube.close()
    assert raised.value.status == 0 and raised.value.reason == "Timeout"
    assert "no answer from the API server within 0.3s" in str(raised.value)
    assert kube.last_answer == answered  # silence is not an answer: /healthz sees it


def test_the_api_server_counts_as_healthy_until_it_has_been_silent_for_the_limit() -> None:
    now = time.monotonic()
    assert api_healthy(now - 59.9, now, 60.0)
    assert not api_healthy(now - 60.0, now, 60.0)
