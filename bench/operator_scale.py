"""Operator scale: N jobs × M workers against a real Kubernetes API server.

Without --kubeconfig the bench starts its own control plane (kube-apiserver, etcd, kube-controller-manager,
kube-scheduler; tests/cluster/controlplane.py, from $KUBETRAIN_K8S_ASSETS or ../shared/k8s) and stops and
wipes it at the end. With --kubeconfig it uses that cluster. Either way it applies the LLMTrainingJob CRD
if absent (and deletes it again if it applied it to an existing cluster), works in namespaces of its own,
and deletes them at the end.

Measured per run, for the real operator (`kubetrain operator -n NS`, its own process, default settings):
  - time from creating N LLMTrainingJobs to all N×M worker pods created (seen by the bench's own watch), and
    pods created per second;
  - the baseline, in the same run: a bare aiohttp client POSTing the same N×M pods (the operator's own
    rendering of them, for N real jobs, so their ownerReferences hold) at the same concurrency, timed the
    same way; the operator's rate as a ratio of it. The order of the two alternates from run to run;
  - time for every job's status.workers.ready to reach M after the bench turns all pods Running and Ready
    (it plays kubelet; there is no kubelet and no node, so nothing else runs the pods);
  - the operator process's peak RSS (sampled every 50 ms);
  - CPU seconds of the operator, of each control-plane process (when it runs on this machine) and of every
    other process, and the API server's request and watch-event counters, per timed phase.

The pods' IP is the host address of a test bridge the bench makes (EndpointSlices refuse loopback), where the bench
answers the operator's GET /progress as a training worker would (the step advances at each read).

    .venv/bin/python bench/operator_scale.py --jobs 100 --workers 16 --runs 2
    .venv/bin/python bench/operator_scale.py --kubeconfig ~/.kube/config --jobs 100 --workers 16

With --kubeconfig the identity needs to create CRDs (if absent) and namespaces, the operator's RBAC, and
pod create/delete/patch-status. Issue 4's aims: all 1,600 pods in ≤ 4 s, ≥ 0.5× the bare client's rate,
status converged ≤ 3 s after the last pod change, operator RSS ≤ 250 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

# The parts live in bench/_operator_scale/, one concern per module (its __init__ lists them).
from _operator_scale.report import report
from _operator_scale.runs import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", help="an existing cluster (default: start a control plane here)")
    parser.add_argument("--namespace-prefix", default="kubetrain-bench",
                        help="each run makes PREFIX-<random>-bare and PREFIX-<random>-op, deleted afterwards")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1, help="bare client and operator per run; the order alternates")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (both contenders)")
    parser.add_argument("--retries", type=int, default=2,
                        help="measure a run again (at most this often) while other processes take > 10%% of the "
                             "machine in one of its timed phases; the least disturbed attempt is kept")
    parser.add_argument("--settle", type=float, default=180.0,
                        help="before each contender, wait at most this long for the machine to be < 15%% busy")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(measure(args))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
