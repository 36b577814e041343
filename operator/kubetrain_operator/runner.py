"""`kubetrain operator`: Kopf with this operator's handlers, settings, liveness and metrics endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from .controller import OperatorConfig
from .kube import Kube
from .leader import ElectionConfig, LeaderElector, lead

log = logging.getLogger(__name__)


async def run(namespaces: Sequence[str], all_namespaces: bool, liveness_port: int | None, metrics_port: int | None,
              config: OperatorConfig | None = None, stop: asyncio.Event | None = None,
              election: ElectionConfig | None = None) -> int:
    """Run the operator until it is stopped (0), or until it loses leadership (1: the pod restarts and
    comes back as a standby). With `election`, it serves /metrics and /healthz while standing by, and
    runs Kopf only while it holds the Lease."""
    import kopf

    from . import handlers
    from .metrics import OperatorMetrics, serve

    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    memo = kopf.Memo(config=config or OperatorConfig.from_env())
    idle = OperatorMetrics(lambda: {})  # until the startup handler has made the Runtime
    own = CollectorRegistry()  # this replica's own state, kept across Kopf (re)starts
    leading = Gauge("kubetrain_operator_leader", "1 while this replica is the active operator, 0 on standby",
                    registry=own)

    def exposition() -> bytes:
        runtime = getattr(memo, "runtime", None)
        return (runtime.metrics if runtime is not None else idle).exposition() + generate_latest(own)

    metrics_server = await serve(exposition, metrics_port) if metrics_port is not None else None
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None

    async def operate(stop_flag: asyncio.Event) -> None:
        leading.set(1)
        try:
            await kopf.operator(settings=settings, memo=memo, clusterwide=all_namespaces, namespaces=list(namespaces),
                                standalone=True, liveness_endpoint=liveness, stop_flag=stop_flag)
        finally:
            leading.set(0)

    try:
        if election is None:
            await operate(stop or asyncio.Event())
            return 0
        return await _with_election(election, operate, stop or _stop_on_signals())
    finally:
        if metrics_server is not None:
            await metrics_server.cleanup()


async def _with_election(election: ElectionConfig, operate: Callable[[asyncio.Event], Awaitable[None]],
                         stop: asyncio.Event) -> int:
    """Stand by until this replica holds the Lease, then operate; `stop` ends either (exit 0)."""
    kube = await Kube.connect(concurrency=2)
    elector = LeaderElector(kube, election)
    log.info("leader election: %s is standing by for lease %s/%s", election.identity, election.namespace,
             election.name)

    async def until_stopped(flag: asyncio.Event) -> None:
        relay = asyncio.ensure_future(_relay(stop, flag))  # a stop while leading stops Kopf
        try:
            await operate(flag)
        finally:
            relay.cancel()

    leading = asyncio.ensure_future(lead(elector, until_stopped))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({leading, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not leading.done() and not elector.leading:  # stopped while standing by
            leading.cancel()
        kept = await asyncio.gather(leading, return_exceptions=True)
        result = kept[0]
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
        return 1 if result is False else 0
    finally:
        stopped.cancel()
        await kube.close()


def _stop_on_signals() -> asyncio.Event:
    """SIGTERM/SIGINT set the event: a standby exits at once, a leader stops Kopf and releases the Lease.
    (Kopf installs its own handlers while it runs; this covers the time around it.)"""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def main(namespaces: Sequence[str], all_namespaces: bool, liveness_port: int | None, metrics_port: int | None,
         verbose: bool = False, election: ElectionConfig | None = None) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return asyncio.run(run(namespaces, all_namespaces, liveness_port, metrics_port, election=election))
