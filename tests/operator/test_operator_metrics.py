"""metrics.py: the operator's Prometheus metrics and the endpoint serving them (/metrics, /healthz)."""

from __future__ import annotations

import pytest


@pytest.mark.asyncio
async def test_metrics_endpoint_serves_the_operator_metrics() -> None:
    import aiohttp
    from kubetrain_operator.metrics import JobSummary, OperatorMetrics, bound_port, serve

    jobs = {("ml", "a"): JobSummary.of("Running", {"restarts": 2, "workers": {"desired": 4, "active": 3, "ready": 3}}),
            ("ml", "b"): JobSummary.of("Failed", {"reason": "InvalidSpec", "workers": "garbage"})}
    metrics = OperatorMetrics(lambda: jobs)
    metrics.restarts.labels(reason="OOMKilled").inc()
    runner = await serve(metrics.exposition, 0, host="127.0.0.1")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{bound_port(runner)}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"http://127.0.0.1:{bound_port(runner)}/healthz") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    assert 'kubetrain_operator_jobs{phase="Running"} 1.0' in text
    assert 'kubetrain_operator_jobs{phase="Pending"} 0.0' in text
    assert 'kubetrain_operator_job_phase{job_name="b",namespace="ml",phase="Failed",reason="InvalidSpec"} 1.0' in text
    assert 'kubetrain_operator_job_restarts{job_name="a",namespace="ml"} 2.0' in text
    assert 'kubetrain_operator_job_workers{job_name="a",namespace="ml",state="active"} 3.0' in text
    assert 'kubetrain_operator_job_workers{job_name="b",namespace="ml",state="desired"} 0.0' in text
    assert 'kubetrain_operator_restarts_total{reason="OOMKilled"} 1.0' in text
    assert "kubetrain_operator_reconcile_duration_seconds_bucket" in text
