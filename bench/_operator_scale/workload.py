"""What both contenders are given: N LLMTrainingJobs of M workers each, whose pods no node ever runs."""

from __future__ import annotations

from typing import Any

import aiohttp

from .api import check, gather_limited, jobs_url

NO_NODE = {"kubetrain.io/bench": "no-such-node"}
MAX_STEPS = 1_000_000


def job_spec(workers: int, metrics_port: int) -> dict[str, Any]:
    """A small valid LLMTrainingJob spec whose pods no scheduler can place (there are no nodes anyway);
    its workers' /progress is the bench's own server (`metrics_port`, 0: none)."""
    return {
        "image": "kubetrain/trainer:bench",
        "model": {"preset": "tiny"},
        "tokenizer": {"path": "/data/tokenizer"},
        "data": {"train": "/data/train", "validation": "/data/validation", "seqLength": 64},
        "training": {"maxSteps": MAX_STEPS, "globalBatchSize": 16 * workers, "microBatchSize": 2},
        "checkpoint": {"uri": "/checkpoints/job"},
        "workers": {"nodes": workers, "procPerNode": 1, "podTemplate": {"nodeSelector": NO_NODE}},
        "runPolicy": {"maxRestarts": 3, "restartBackoffSeconds": 10},
        "metrics": {"port": metrics_port},
    }


async def create_jobs(http: aiohttp.ClientSession, ns: str, jobs: int, workers: int, concurrency: int,
                      metrics_port: int) -> list[dict[str, Any]]:
    spec = job_spec(workers, metrics_port)

    async def create(j: int) -> dict[str, Any]:
        body = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                "metadata": {"name": f"bench-{j}", "namespace": ns}, "spec": spec}
        async with http.post(jobs_url(ns), json=body) as resp:
            return dict(await check(resp, 201))

    return await gather_limited(concurrency, [create(j) for j in range(jobs)])
