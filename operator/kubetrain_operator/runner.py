"""`kubetrain operator`: Kopf with this operator's handlers, settings, liveness and metrics endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from .controller import OperatorConfig


async def run(namespaces: Sequence[str], all_namespaces: bool, liveness_port: int | None, metrics_port: int | None,
              config: OperatorConfig | None = None, stop: asyncio.Event | None = None) -> None:
    import kopf

    from . import handlers
    from .metrics import serve

    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    memo = kopf.Memo(config=config or OperatorConfig.from_env())
    metrics_server = None
    if metrics_port is not None:
        from .metrics import OperatorMetrics

        idle = OperatorMetrics(lambda: {})  # until the startup handler has made the Runtime

        def exposition() -> bytes:
            runtime = getattr(memo, "runtime", None)
            return (runtime.metrics if runtime is not None else idle).exposition()

        metrics_server = await serve(exposition, metrics_port)
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    try:
        await kopf.operator(settings=settings, memo=memo, clusterwide=all_namespaces,
                            namespaces=list(namespaces), standalone=True, liveness_endpoint=liveness,
                            stop_flag=stop)
    finally:
        if metrics_server is not None:
            await metrics_server.cleanup()


def main(namespaces: Sequence[str], all_namespaces: bool, liveness_port: int | None, metrics_port: int | None,
         verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    kwargs: dict[str, Any] = {"namespaces": namespaces, "all_namespaces": all_namespaces,
                              "liveness_port": liveness_port, "metrics_port": metrics_port}
    asyncio.run(run(**kwargs))
    return 0
