"""Elastic healing and resizing on the test bed: how long a 2-node job takes to train again after one worker is
killed with SIGKILL, and after a scale 2 → 1, against a cold start of the same job in the same run.

It starts its own test bed (tests/cluster: kube-apiserver, etcd, controller manager, scheduler from
../shared/k8s; a bridge and two local nodes running pods as processes; needs root), moto S3 on the bridge,
`kubetrain operator` on the host, and prepares a small corpus (10 plays, a 512-token BPE) into S3. Then, per
run, a fresh job (tests/support/bed.py's manifest: the test model, 2 nodes, one process each, a checkpoint
every 6 steps):

  - **cold start** (the baseline): `kubectl apply` → status.progress shows step ≥ 1;
  - **heal**: once a checkpoint is committed, SIGKILL worker 1's trainer container → training advances past
    the step the relaunched group resumed from; steps redone = the last step reported before the kill −
    the step resumed from (what the newest committed checkpoint could not save), restarts counted;
  - **resize**: `spec.workers.nodes: 1` → the single worker advances past the step it resumed from; steps
    redone the same way (the SIGTERM checkpoint should make it 0), restarts counted.

Heal and resize are printed as seconds and as ratios of the cold start. Every phase includes Python and torch
start-up of fresh pods on a 2-core machine, which dominates.

    sudo .venv/bin/python bench/elastic_heal.py --runs 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test bed and its vocabulary (tests/cluster, tests/support)

from cluster.bed import LocalCluster  # noqa: E402
from cluster.client import Kube  # noqa: E402
from cluster.controlplane import ControlPlane, missing_assets  # noqa: E402
from support import stop_process  # noqa: E402
from support.bed import (  # noqa: E402
    JOBS,
    advanced,
    apply,
    apply_crd,
    committed_steps,
    manifest,
    pod_uids,
    progress_step,
    resumed_step,
    secret,
    start_bed_s3,
    start_operator,
    status,
    workers,
)
from support.runs import KUBETRAIN  # noqa: E402

PHASE_TIMEOUT = 600.0


def wait(condition: Any, what: str, timeout: float = PHASE_TIMEOUT, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def prepare(workdir: Path) -> Path:
    from kubetrain_trainer.preparation import resolve_inputs

    corpus = workdir / "corpus"
    corpus.mkdir()
    for f in resolve_inputs("corpus://shakespeare", "data.train")[:10]:
        shutil.copy(f, corpus / f.name)
    out = workdir / "prepared"
    subprocess.run([*KUBETRAIN, "prepare", "--input", str(corpus), "--train-tokenizer", "512",
                    "--validation-split", "0.2", "--output", str(out)], check=True, capture_output=True)
    return out


def namespace(kube: Kube) -> str:
    name = f"heal-{uuid.uuid4().hex[:6]}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait(lambda: kube.find(f"/api/v1/namespaces/{name}/serviceaccounts/default"), "the default ServiceAccount")
    return name


def one_run(bed: LocalCluster, kube: Kube, s3: Any, workdir: Path, run: int) -> dict[str, Any]:
    ns, name = namespace(kube), "heal"
    proc, log = start_operator(bed.control_plane.kubeconfig, ns, workdir / f"operator-{run}.log")
    try:
        body = manifest(ns, name, s3, secret(kube, ns), training={"maxSteps": 5000, "evalEvery": 1000},
                        checkpoint={"everySteps": 6, "keep": 2, "exportHF": False},
                        workers={"nodes": 2, "minNodes": 1, "maxNodes": 2})
        started = time.monotonic()
        apply(bed.control_plane, body, workdir)
        wait(lambda: progress_step(kube, ns, name) >= 1, "the first step")
        cold = time.monotonic() - started

        wait(lambda: committed_steps(s3, ns, name), "a committed checkpoint")
        group, before = pod_uids(kube, ns, name), progress_step(kube, ns, name)
        victim = next(p for p in workers(kube, ns, name) if p["metadata"]["name"].endswith("-worker-1"))
        killed = time.monotonic()
        bed.node(victim["spec"]["nodeName"]).kill(ns, victim["metadata"]["name"], sig=signal.SIGKILL)
        resumed = wait(lambda: resumed_step(bed, kube, ns, name, group), "the relaunched group's resume")
        wait(lambda: advanced(kube, ns, name, before, resumed), "a step after the relaunch")
        heal = time.monotonic() - killed
        heal_redone, heal_restarts = max(0, before - resumed), status(kube, ns, name).get("restarts", 0)

        group, before = pod_uids(kube, ns, name), progress_step(kube, ns, name)
        scaled = time.monotonic()
        kube.patch(JOBS.format(ns=ns) + f"/{name}", {"spec": {"workers": {"nodes": 1}}})
        resumed_1 = wait(lambda: resumed_step(bed, kube, ns, name, group), "the resized group's resume")
        wait(lambda: len(workers(kube, ns, name)) == 1 and advanced(kube, ns, name, before, resumed_1),
             "a step at 1 worker")
        resize = time.monotonic() - scaled
        resize_redone = max(0, before - resumed_1)
        return {"cold_start_s": cold, "heal_s": heal, "heal_steps_redone": heal_redone,
                "heal_restarts": heal_restarts, "resize_s": resize, "resize_steps_redone": resize_redone,
                "resize_restarts": status(kube, ns, name).get("restarts", 0) - heal_restarts}
    finally:
        stop_process(proc)
        log.close()
        kube.delete(f"/api/v1/namespaces/{ns}")


def report(runs: list[dict[str, Any]]) -> None:
    cold = statistics.median(r["cold_start_s"] for r in runs)
    print(f"\n{'run':>3} {'cold start':>10} {'heal':>7} {'× cold':>6} {'redone':>6} {'restarts':>8} "
          f"{'resize':>7} {'× cold':>6} {'redone':>6} {'restarts':>8}")
    for i, r in enumerate(runs, 1):
        print(f"{i:>3} {r['cold_start_s']:>9.1f}s {r['heal_s']:>6.1f}s {r['heal_s'] / r['cold_start_s']:>6.2f} "
              f"{r['heal_steps_redone']:>6} {r['heal_restarts']:>8} {r['resize_s']:>6.1f}s "
              f"{r['resize_s'] / r['cold_start_s']:>6.2f} {r['resize_steps_redone']:>6} {r['resize_restarts']:>8}")
    heal, resize = (statistics.median(r[k] for r in runs) for k in ("heal_s", "resize_s"))
    print(f"median: cold start {cold:.1f}s (baseline); heal {heal:.1f}s = {heal / cold:.2f}× cold start; "
          f"resize {resize:.1f}s = {resize / cold:.2f}× cold start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the measurements here too")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (pods' and operator's logs)")
    args = parser.parse_args()
    why = missing_assets()
    if why:
        raise SystemExit(why)
    workdir = Path(tempfile.mkdtemp(prefix="kubetrain-bench-heal-"))
    plane = ControlPlane.start(workdir / "k8s")
    kube = Kube(plane.kubeconfig)
    bed = s3 = None
    try:
        bed = LocalCluster.start(plane, workdir / "nodes")
        s3 = start_bed_s3(bed.network.gateway, prepare(workdir), workdir / "moto")
        apply_crd(plane.kubeconfig)
        runs = []
        for run in range(args.runs):
            runs.append(one_run(bed, kube, s3, workdir, run))
            print(json.dumps(runs[-1]), flush=True)
        report(runs)
        if args.json:
            args.json.write_text(json.dumps(runs, indent=1) + "\n")
    finally:
        if s3 is not None:
            s3.stop()
        if bed is not None:
            bed.stop()
        kube.close()
        plane.stop()
        if args.keep:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
