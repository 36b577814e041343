"""What status says of a job on the test bed (the operator as a process, real trainer pods, S3 on moto): the
SIGTERM checkpoint of a suspend, read from worker 0's final report after its pod is gone, in status.checkpoint
and the catalogue status.checkpoints; after a resume to the end, the final evaluation (loss and perplexity)
and the catalogue as retention left it in S3.

Fixtures: tests/e2e/conftest.py; the helpers: tests/support/bed.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from cluster.client import Kube
from support import wait_for
from support.bed import BUCKET, JOBS, long_job_at_step, status, wait_or_explain, workers
from support.s3 import MotoServer, objects

pytestmark = pytest.mark.slow


def committed_steps(s3: MotoServer, prefix: str) -> list[int]:
    keys = objects(s3.client(), BUCKET, prefix)
    return sorted(int(k.split("step-")[1][:9]) for k in keys if k.endswith("/COMMITTED"))


def listed(ns: str, name: str, steps: list[int]) -> list[dict[str, Any]]:
    """status.checkpoints without the times (checked apart)."""
    return [{"step": s, "uri": f"s3://{BUCKET}/{ns}/{name}/step-{s:09d}"} for s in steps]


def test_a_suspend_shows_its_sigterm_checkpoint_and_a_finished_job_its_final_evaluation_and_catalogue(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        tmp_path: Path) -> None:
    """One piece: the second half resumes from the first half's SIGTERM checkpoint (one pod start saved)."""
    ns, name = namespace, "reported"
    why = long_job_at_step(local_cluster, kube, control_plane, ns, name, bed_s3, tmp_path, 3, workers={"nodes": 1})
    kube.patch(JOBS.format(ns=ns) + f"/{name}", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for(lambda: not workers(kube, ns, name), timeout=120, what="the suspended job's pods to go")
    steps = committed_steps(bed_s3, f"{ns}/{name}/")
    assert len(steps) == 1, steps  # no periodic checkpoint: this is the SIGTERM one
    sigterm = steps[0]
    # No poll of /progress saw that commit (the job was already Suspended): only worker 0's final report says it.
    wait_or_explain(lambda: (status(kube, ns, name).get("checkpoint") or {}).get("step") == sigterm, why, 60,
                    f"status.checkpoint to show the SIGTERM checkpoint of step {sigterm}")
    st = status(kube, ns, name)
    assert st["phase"] == "Suspended" and st["progress"]["step"] == sigterm, why()
    assert st["checkpoint"]["uri"] == listed(ns, name, [sigterm])[0]["uri"] and st["checkpoint"]["time"]
    assert [{k: c[k] for k in ("step", "uri")} for c in st["checkpoints"]] == listed(ns, name, [sigterm])

    end = sigterm + 2
    kube.patch(JOBS.format(ns=ns) + f"/{name}",
               {"spec": {"runPolicy": {"suspend": False}, "training": {"maxSteps": end}}})
    wait_or_explain(lambda: status(kube, ns, name).get("phase") == "Succeeded", why, 300, "the resumed job to succeed")
    st = status(kube, ns, name)
    progress = st["progress"]
    assert (progress["step"], progress["phase"]) == (end, "done"), why()
    assert progress["evalPerplexity"] == pytest.approx(math.exp(progress["evalLoss"]), rel=2e-3)  # 4 digits each
    steps = committed_steps(bed_s3, f"{ns}/{name}/")
    assert steps == [sigterm, end]  # keep: 2, and the final checkpoint
    assert st["checkpoint"]["step"] == end
    assert [{k: c[k] for k in ("step", "uri")} for c in st["checkpoints"]] == listed(ns, name, steps)
    assert st["checkpoints"][0]["time"] <= st["checkpoints"][1]["time"] == st["checkpoint"]["time"]
