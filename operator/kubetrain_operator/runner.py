"""`kubetrain operator`: Kopf with this operator's handlers, settings, liveness and metrics endpoints.

At start it checks that the API server answers with these credentials, and exits with one line saying
why when it does not (a bad kubeconfig, no cluster): Kopf alone would log tracebacks and retry forever.
While running, /healthz turns 503 once the API server has not answered for `unhealthy_after` seconds.
On a clean shutdown it removes Kopf's finalizer from the jobs it serves: Kopf puts one on every job (its
daemons need it while they run) and leaves it on exit, so without this, a job deleted while no operator
runs (after `helm uninstall`) would stay Terminating, and its namespace with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from .controller import OperatorConfig
from .kube import Kube, KubeError
from .leader import ElectionConfig, LeaderElector, lead

log = logging.getLogger(__name__)

UNHEALTHY_AFTER = 60.0  # seconds without an answer from the API server before /healthz says 503
HEARTBEAT_SECONDS = 5.0


class StartupError(Exception):
    """The operator cannot start; the message is the one line to print."""


async def connect() -> Kube:
    """A client whose API server has answered once, or StartupError saying what is wrong."""
    source = os.environ.get("KUBECONFIG") or "the pod's service account, else ~/.kube/config"
    if os.environ.get("KUBECONFIG") and not any(os.path.isfile(p) for p in source.split(os.pathsep)):
        raise StartupError(f"kubetrain operator: KUBECONFIG={source}: no such file")
    try:
        kube = await Kube.connect(concurrency=8, request_timeout=10.0)
    except Exception as exc:  # the loaders raise anything from ConfigException to TypeError on a bad file
        raise StartupError(f"kubetrain operator: cannot load Kubernetes credentials from {source}: "
                           f"{type(exc).__name__}: {_one_line(exc)}") from None
    try:
        await kube.ping()
    except KubeError as exc:
        await kube.close()
        reason = exc.message if exc.status == 0 else str(exc)
        raise StartupError(f"kubetrain operator: the Kubernetes API server at {kube.server} did not answer: "
                           f"{_one_line(reason)} (check $KUBECONFIG and that the cluster is reachable)") from None
    return kube


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def heartbeat(kube: Kube, every: float = HEARTBEAT_SECONDS) -> None:
    """Asks the API server for its version now and then, so /healthz knows it still answers even when no
    job needs a call (each answer sets kube.last_answer)."""
    while True:
        await asyncio.sleep(every)
        try:
            await kube.ping()
        except KubeError as exc:
            log.warning("the API server did not answer: %s", exc)


def api_healthy(last_answer: float, now: float, unhealthy_after: float) -> bool:
    return now - last_answer < unhealthy_after


async def release_finalizers(kube: Kube, namespaces: Sequence[str] | None, finalizer: str) -> int:
    """Remove `finalizer` from every served job that has it (namespaces None: all); how many it did. Failures
    are logged, not raised: a shutdown goes on (during `helm uninstall --no-hooks` the RBAC is gone already)."""
    try:
        jobs = [job for ns in (namespaces if namespaces is not None else [None]) for job in await kube.list_jobs(ns)]
    except KubeError as exc:
        log.warning("could not list the jobs to remove the finalizer %s (docs/operations.md, Uninstall): %s",
                    finalizer, exc)
        return 0
    removals = [kube.remove_job_finalizer(job["metadata"]["namespace"], job["metadata"]["name"], finalizer,
                                          job["metadata"]["finalizers"].index(finalizer))
                for job in jobs if finalizer in (job["metadata"].get("finalizers") or [])]
    done = await asyncio.gather(*removals, return_exceptions=True)
    for failed in (d for d in done if isinstance(d, BaseException)):
        log.warning("could not remove the finalizer %s from a job: %s", finalizer, failed)
    return sum(d is True for d in done)


async def run(namespaces: Sequence[str], all_namespaces: bool, liveness_port: int | None, metrics_port: int | None,
              config: OperatorConfig | None = None, stop: asyncio.Event | None = None,
              election: ElectionConfig | None = None, unhealthy_after: float = UNHEALTHY_AFTER) -> int:
    """Run the operator until it is stopped (0), or until it loses leadership (1: the pod restarts and
    comes back as a standby). With `election`, it serves /metrics and /healthz while standing by, and
    runs Kopf only while it holds the Lease. StartupError when the API server cannot be reached."""
    import kopf

    from . import handlers
    from .metrics import OperatorMetrics, serve

    kube = await connect()
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    memo = kopf.Memo(config=config or OperatorConfig.from_env())
    idle = OperatorMetrics(lambda: {})  # until the startup handler has made the Runtime
    own = CollectorRegistry()  # this replica's own state, kept across Kopf (re)starts
    leading = Gauge("kubetrain_operator_leader", "1 while this replica is the active operator, 0 on standby",
                    registry=own)
    elector = LeaderElector(kube, election) if election is not None else None

    def exposition() -> bytes:
        runtime = getattr(memo, "runtime", None)
        return (runtime.metrics if runtime is not None else idle).exposition() + generate_latest(own)

    def healthy() -> bool:
        return api_healthy(kube.last_answer, time.monotonic(), unhealthy_after)

    beat = asyncio.ensure_future(heartbeat(kube))
    metrics_server = await serve(exposition, metrics_port, healthy=healthy) if metrics_port is not None else None
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None

    async def operate(stop_flag: asyncio.Event) -> None:
        leading.set(1)
        try:
            await kopf.operator(settings=settings, memo=memo, clusterwide=all_namespaces, namespaces=list(namespaces),
                                standalone=True, liveness_endpoint=liveness, stop_flag=stop_flag)
        finally:
            leading.set(0)
        if elector is None or elector.leading:  # after a lost Lease, the new leader owns the finalizers
            released = await release_finalizers(kube, None if all_namespaces else namespaces,
                                                settings.persistence.finalizer)
            log.info("removed the finalizer %s from %d jobs", settings.persistence.finalizer, released)

    try:
        if elector is None:
            await operate(stop or asyncio.Event())
            return 0
        return await _with_election(elector, operate, stop or _stop_on_signals())
    finally:
        beat.cancel()
        if metrics_server is not None:
            await metrics_server.cleanup()
        await kube.close()


async def _with_election(elector: LeaderElector, operate: Callable[[asyncio.Event], Awaitable[None]],
                         stop: asyncio.Event) -> int:
    """Stand by until this replica holds the Lease, then operate; `stop` ends either (exit 0)."""
    election = elector.config
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
         verbose: bool = False, election: ElectionConfig | None = None,
         unhealthy_after: float = UNHEALTHY_AFTER) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        return asyncio.run(run(namespaces, all_namespaces, liveness_port, metrics_port, election=election,
                               unhealthy_after=unhealthy_after))
    except StartupError as exc:
        print(exc, file=sys.stderr)
        return 1
