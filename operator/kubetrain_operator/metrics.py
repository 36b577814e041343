"""The operator's own Prometheus metrics, and the small HTTP server that serves them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from kubetrain_api.status import PHASES
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class JobSummary:
    """What the metrics show of one job: its phase and reason, counted restarts and workers by state."""

    phase: str
    reason: str = ""
    restarts: int = 0
    workers: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, phase: str, status: Mapping[str, Any]) -> JobSummary:
        raw = status.get("workers")
        workers: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        return cls(phase, str(status.get("reason") or ""), int(status.get("restarts") or 0),
                   {state: int(workers.get(state) or 0) for state in WORKER_STATES})


WORKER_STATES = ("desired", "active", "ready", "failed")


class _JobsCollector(Collector):
    """Gauges read from the operator's current view of its jobs at scrape time (labels: namespace,
    job_name — as the PodMonitor labels the training pods' metrics, so dashboards join them)."""

    def __init__(self, jobs: Callable[[], Mapping[tuple[str, str], JobSummary]]):
        self._jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = dict(self._jobs())
        by_phase = GaugeMetricFamily("kubetrain_operator_jobs", "LLMTrainingJobs handled, by phase", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for summary in jobs.values():
            counts[summary.phase] = counts.get(summary.phase, 0) + 1
        for phase, n in counts.items():
            by_phase.add_metric([phase], n)
        yield by_phase
        phases = GaugeMetricFamily("kubetrain_operator_job_phase", "1 for each job's current phase, with its reason",
                                  labels=["namespace", "job_name", "phase", "reason"])
        restarts = GaugeMetricFamily("kubetrain_operator_job_restarts", "Restarts counted (status.restarts)",
                                     labels=["namespace", "job_name"])
        workers = GaugeMetricFamily("kubetrain_operator_job_workers", "The job's worker pods by state (status.workers)",
                                    labels=["namespace", "job_name", "state"])
        for (namespace, name), summary in sorted(jobs.items()):
            phases.add_metric([namespace, name, summary.phase, summary.reason], 1)
            restarts.add_metric([namespace, name], summary.restarts)
            for state in WORKER_STATES:
                workers.add_metric([namespace, name, state], summary.workers.get(state, 0))
        yield phases
        yield restarts
        yield workers


class OperatorMetrics:
    def __init__(self, jobs: Callable[[], Mapping[tuple[str, str], JobSummary]]):
        r = self.registry = CollectorRegistry()
        self.reconcile_seconds = Histogram(
            "kubetrain_operator_reconcile_duration_seconds", "Time to plan and apply one reconcile of a job",
            registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.pods_created = Counter("kubetrain_operator_pods_created", "Worker pods created", registry=r)
        self.pods_deleted = Counter("kubetrain_operator_pods_deleted", "Worker pods deleted", registry=r)
        self.restarts = Counter("kubetrain_operator_restarts", "Worker restarts counted, by reason", ["reason"],
                                registry=r)
        self.errors = Counter("kubetrain_operator_errors",
                              "Failed reconciles, refused pod creates and progress reads, by kind", ["kind"],
                              registry=r)
        self.progress_reads = Counter("kubetrain_operator_progress_reads", "Reads of worker 0's /progress",
                                      ["result"], registry=r)
        r.register(_JobsCollector(jobs))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(exposition: Callable[[], bytes], port: int, host: str = "0.0.0.0",
                healthy: Callable[[], bool] = lambda: True) -> web.AppRunner:
    """/metrics (what `exposition` returns) and /healthz on `port` (0: a free port, see bound_port)."""

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n" if healthy() else "unhealthy\n", status=200 if healthy() else 503)

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        for sock in getattr(server, "sockets", None) or []:
            return int(sock.getsockname()[1])
    raise RuntimeError("the metrics server is not listening")
