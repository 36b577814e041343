"""A real HTTP server for tests that need one to answer (a worker's /progress, a redirect's target)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from support import free_port


@asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                  seen: list[str]) -> AsyncIterator[int]:
    """aiohttp on 127.0.0.1 (also the played pods' IP) answering every GET with `handler`; yields its port;
    `seen` gets each path it is asked."""

    async def recorded(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return await handler(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", recorded)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()
