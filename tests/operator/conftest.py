"""Fixtures of the operator's tests (several files use each): `started` for the planner's (pure, on
support.operator.Sim); for those against a real API server, `kubeconfig` (the test modules use it for every
test), the played kubelet, the jobs' API and `launched`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cluster.client import Kube
from support import spec_dict, wait_until
from support.operator import Jobs, PlayedKubelet, Sim


@pytest.fixture
def started() -> Callable[..., Sim]:
    """started(**sections): in the planner's in-memory cluster, a job (PLACEHOLDER_SPEC with `sections`)
    whose workers were created and are all running."""

    def started(**sections: Any) -> Sim:
        sim = Sim(spec_dict(**sections))
        sim.step()
        sim.run_all()
        sim.step(1)
        assert sim.phase == "Running"
        return sim

    return started


@pytest.fixture
def kubeconfig(control_plane: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The operator in this process finds the cluster as `kubetrain operator` does outside one."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return Path(control_plane.kubeconfig)


@pytest_asyncio.fixture
async def kubelet(played_kubelet: PlayedKubelet) -> AsyncIterator[PlayedKubelet]:
    async with played_kubelet.running():
        yield played_kubelet


@pytest.fixture
def jobs(kube: Kube, namespace: str, llmtrainingjob_crd: str) -> Jobs:
    return Jobs(kube, namespace)


@pytest.fixture
def launched(jobs: Jobs, kubelet: PlayedKubelet) -> Callable[..., Awaitable[None]]:
    """await launched(manifest, running=True): the job created and its pods there; with `running`, the
    kubelet runs them all and the job is Running."""

    async def launched(manifest: dict[str, Any], running: bool = True) -> None:
        name = manifest["metadata"]["name"]
        nodes = manifest["spec"]["workers"]["nodes"]
        jobs.create(manifest)
        await wait_until(lambda: len(kubelet.pods(name)) == nodes, what=f"{nodes} pods")
        if running:
            await kubelet.run_all(name)
            await wait_until(jobs.phase_is("Running", name), what="Running")

    return launched
