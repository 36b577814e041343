"""Kopf handlers: thin, one concept each; the work is in controller.py (loops) and planner.py (logic).

Run with `kubetrain operator` (or `kopf run -m kubetrain_operator.handlers`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf
from kubetrain_api.manifest import GROUP, PLURAL, VERSION

from .controller import OperatorConfig, Runtime, reconcile_loop
from .pods import ObservedPod, observe_pod
from .preparation import ROLE, StageJob, StagePod, observe_stage_job, observe_stage_pod
from .progress_loop import progress_loop
from .render import LABEL_JOB, LABEL_ROLE

JOBS = (GROUP, VERSION, PLURAL)
# Kopf puts it on every job (its daemons need one) and never removes it on exit: runner.py and uninstall.py do.
FINALIZER = f"{GROUP}/finalizer"
Logger = logging.Logger | logging.LoggerAdapter[Any]


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf's settings for this operator (also used by tests that run it in-process)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.reporting_component = "kubetrain-operator"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300  # re-list every few minutes: level-triggered even if a watch drops
    # Kopf's own calls: its default is 5 minutes per request and no connect timeout, so a half-open connection
    # would stall a patch for that long; a watch is cut off a minute past the server's own timeout.
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 5
    settings.watching.connect_timeout = 5
    settings.watching.client_timeout = settings.watching.server_timeout + 60
    settings.execution.max_workers = 4
    # No CRD/namespace scanning: the served namespaces are named (or all), and the chart installs the CRD
    # before the operator, so Kopf needs no cluster-wide list/watch on namespaces or CRDs (least privilege).
    settings.scanning.disabled = True


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings)
    config = getattr(memo, "config", None) or OperatorConfig.from_env()
    memo.runtime = await Runtime.start(config)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else $KUBECONFIG (read afresh at every start).

    In a pod, the API server is where $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT say, as for client-go's
    in-cluster config and this operator's own client (kube.py); Kopf's service-account login alone assumes
    https://kubernetes.default.svc, which needs cluster DNS and port 443."""
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        return kopf.login_with_kubeconfig(**kwargs)
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if host and port:
        info = dataclasses.replace(info, server=f"https://{f'[{host}]' if ':' in host else host}:{port}")
    return info


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    runtime = getattr(memo, "runtime", None)
    if runtime is not None:
        await runtime.close()


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT})
def worker_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, ObservedPod]:
    """Worker pods by (namespace, job name): what every reconcile observes, kept current by the watch. The data
    preparation's pods carry the job's label too, with another role: they are not workers."""
    if labels.get(LABEL_ROLE, "worker") != "worker":
        return {}
    pod = observe_pod(dict(body))
    return {} if pod is None else {(namespace, labels[LABEL_JOB]): pod}


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT})
def stage_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, StagePod]:
    """The data preparation's pods, and workers' preparation init containers, by (namespace, job name)."""
    pod = observe_stage_pod(dict(body))
    return {} if pod is None else {(namespace, labels[LABEL_JOB]): pod}


@kopf.index("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT, LABEL_ROLE: ROLE})
def stage_jobs(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, StageJob]:
    """The data preparation's batch Jobs by (namespace, job name)."""
    job = observe_stage_job(dict(body))
    return {} if job is None else {(namespace, labels[LABEL_JOB]): job}


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT, LABEL_ROLE: ROLE})
def stage_job_changed(namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    memo.runtime.wake(namespace, labels.get(LABEL_JOB))


@kopf.on.event("pods", labels={LABEL_JOB: kopf.PRESENT})
async def worker_changed(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: Any,
                         **_: Any) -> None:
    """Wakes the job's reconcile, and keeps an ended worker 0's final report for it (its pod may be gone from
    the index by then). Async, so it runs in the event loop beside the reconcile loops that read the report."""
    memo.runtime.keep_report(namespace, labels.get(LABEL_JOB), observe_pod(dict(body)))
    memo.runtime.wake(namespace, labels.get(LABEL_JOB))


@kopf.on.event(*JOBS)
def job_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    memo.runtime.wake(namespace, name)


@kopf.daemon(*JOBS, id="reconcile", cancellation_timeout=10)
async def reconcile(stopped: kopf.DaemonStopped, body: kopf.Body, memo: Any, logger: Logger, **kwargs: Any) -> None:
    """Keeps the job's pods and status in line with its spec, for as long as the job exists."""
    await reconcile_loop(memo.runtime, body, stopped, kwargs["worker_pods"], logger, kwargs["stage_jobs"],
                         kwargs["stage_pods"])


@kopf.daemon(*JOBS, id="progress", cancellation_timeout=10)
async def progress(stopped: kopf.DaemonStopped, body: kopf.Body, memo: Any, logger: Logger, **kwargs: Any) -> None:
    """Copies worker 0's /progress into status.progress and status.checkpoint (worker_pods: the index)."""
    await progress_loop(memo.runtime, body, stopped, kwargs["worker_pods"], logger)


@kopf.on.probe(id="jobs")
def jobs_handled(memo: Any, **_: Any) -> int:
    runtime = getattr(memo, "runtime", None)
    return len(runtime.wakeups) if runtime is not None else 0
