"""Failures, healing and scaling with real torchrun processes in separate pods on the test bed (the operator
as a process, local nodes, S3 on moto): a configuration error fails the job at once, never retried; a worker
killed with SIGKILL costs one restart and the group resumes from its newest committed checkpoint; a scale
2 → 1 → 2 re-forms the group from a checkpoint of the step it stopped at, redoing no step, counting no restart.

Each test prints what it measured (heal time, steps lost); docs/benchmarks.md has the numbers.
Fixtures: tests/e2e/conftest.py; the helpers: tests/support/bed.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cluster.client import Kube
from support.bed import (
    BUCKET,
    JOBS,
    advanced,
    apply,
    committed_steps,
    diagnose,
    manifest,
    pod_uids,
    progress_step,
    resumed_step,
    secret,
    status,
    wait_or_explain,
    workers,
)
from support.s3 import MotoServer

pytestmark = pytest.mark.slow


def pod_logs(local_cluster: Any, kube: Kube, ns: str, name: str) -> dict[str, str]:
    """Each current worker's log (pods not yet on a node have none)."""
    return {p["metadata"]["name"]: local_cluster.node(p["spec"]["nodeName"]).logs(ns, p["metadata"]["name"])
            for p in workers(kube, ns, name) if p["spec"].get("nodeName")}


def test_a_configuration_error_fails_the_job_at_once_and_is_never_retried(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    """The trainer exits 2 (no tokenizer at tokenizer.path): torchrun does not run it again (one round per
    pod) and the operator fails the job with the trainer's message instead of restarting it."""
    ns = namespace
    body = manifest(ns, "misconfigured", bed_s3, secret(kube, ns),
                    tokenizer={"path": f"s3://{BUCKET}/no-such-tokenizer/"})
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, "misconfigured", tmp_path / "operator.log")  # noqa: E731
    wait_or_explain(lambda: status(kube, ns, "misconfigured").get("phase") == "Failed", why, 180, "Failed")
    st = status(kube, ns, "misconfigured")
    assert (st["reason"], st.get("restarts", 0)) == ("ConfigError", 0), why()
    assert "tokenizer" in st["message"], st["message"]
    def config_error_event() -> bool:  # (Kopf posts events in the background: they may follow the status)
        events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=misconfigured")
        return any(e.get("reason") == "ConfigError" and "tokenizer" in (e.get("message") or "") for e in events)

    wait_or_explain(config_error_event, why, 60, "the ConfigError event")
    for name, log in pod_logs(local_cluster, kube, ns, "misconfigured").items():
        # The trainer ran once in each pod (its error printed once); torchrun never restarted it
        assert log.count("error: tokenizer") <= 1 and "Restarting workers" not in log, f"{name}:\n{log[-3000:]}"


def test_a_worker_killed_with_sigkill_costs_one_restart_and_resumes_from_its_checkpoint(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    ns, name = namespace, "healing"
    body = manifest(ns, name, bed_s3, secret(kube, ns), training={"maxSteps": 48, "evalEvery": 24},
                    checkpoint={"everySteps": 6, "keep": 3, "exportHF": False},
                    workers={"nodes": 2, "minNodes": 1, "maxNodes": 2})
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, name, tmp_path / "operator.log")  # noqa: E731
    wait_or_explain(lambda: (status(kube, ns, name).get("checkpoint") or {}).get("step", 0) >= 6, why, 300,
                    "a committed checkpoint")
    at_kill = committed_steps(bed_s3, ns, name)[-1]
    step_at_kill = progress_step(kube, ns, name)
    group = pod_uids(kube, ns, name)
    victim = next(p for p in workers(kube, ns, name) if p["metadata"]["name"].endswith("-worker-1"))
    killed_at = time.monotonic()
    local_cluster.node(victim["spec"]["nodeName"]).kill(ns, victim["metadata"]["name"], sig=signal.SIGKILL)

    resumed = wait_or_explain(lambda: resumed_step(local_cluster, kube, ns, name, group), why, 240,
                              "the relaunched group to resume")
    wait_or_explain(lambda: advanced(kube, ns, name, step_at_kill, resumed), why, 240,
                    "training to advance after the relaunch")
    heal_seconds = time.monotonic() - killed_at
    # Nothing lost beyond the newest checkpoint committed when the kill came (a later one may have committed)
    assert resumed >= at_kill and resumed in committed_steps(bed_s3, ns, name), (resumed, at_kill)
    print(f"\nheal: {heal_seconds:.1f} s from SIGKILL to a new step; killed at step ~{step_at_kill}, "
          f"resumed from {resumed}: {max(0, step_at_kill - resumed)} steps redone")
    wait_or_explain(lambda: status(kube, ns, name).get("phase") in ("Succeeded", "Failed"), why, 400, "the end")
    st = status(kube, ns, name)
    assert (st["phase"], st.get("restarts")) == ("Succeeded", 1), why()
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector=f"involvedObject.name={name}")
    assert any(e.get("reason") == "WorkerSignal" and "SIGKILL" in (e.get("message") or "") for e in events), \
        [(e.get("reason"), e.get("message")) for e in events]


def test_scaling_2_1_2_reforms_from_the_step_it_stopped_at_without_a_restart(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    ns, name = namespace, "scaled"
    body = manifest(ns, name, bed_s3, secret(kube, ns), training={"maxSteps": 2000, "compile": False},
                    checkpoint={"everySteps": 100000, "exportHF": False},
                    workers={"nodes": 2, "minNodes": 1, "maxNodes": 2})
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, name, tmp_path / "operator.log")  # noqa: E731
    wait_or_explain(lambda: progress_step(kube, ns, name) >= 3, why, 300, "training to reach step 3")
    for size in (1, 2):
        group, before = pod_uids(kube, ns, name), progress_step(kube, ns, name)
        kube.patch(JOBS.format(ns=ns) + f"/{name}", {"spec": {"workers": {"nodes": size}}})
        resumed = wait_or_explain(lambda g=group: resumed_step(local_cluster, kube, ns, name, g), why, 300,
                                  f"the group re-formed at {size} to resume")
        # The stopped group's SIGTERM checkpoint is the step it stopped at: the resume redoes nothing
        assert committed_steps(bed_s3, ns, name)[-1] == resumed, (committed_steps(bed_s3, ns, name), resumed)
        wait_or_explain(lambda n=size, b=before, r=resumed: len(workers(kube, ns, name)) == n
                        and advanced(kube, ns, name, b, r), why, 300, f"training at {size} past step {resumed}")
        st = status(kube, ns, name)
        assert st.get("restarts", 0) == 0 and st["workers"]["desired"] == size, why()
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector=f"involvedObject.name={name}")
    scaled = [e.get("message") for e in events if e.get("reason") == "Scaled"]
    assert any("2 → 1" in m for m in scaled) and any("1 → 2" in m for m in scaled), scaled
