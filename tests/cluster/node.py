"""A local node: a process that does a kubelet's job for the test bed's real control plane, running each
pod bound to it as local processes (see docs/testing.md, "The test bed").

    python -m cluster.node --kubeconfig K --name N --network NET.json --state DIR --images IMAGES.json

It registers Node `N` (Ready, with a Lease heartbeat), watches the pods bound to it, and for each:
a network namespace on the test bridge with a pod IP; /etc/hosts from the cluster's EndpointSlices;
volumes (configMap, secret, emptyDir — Memory is a tmpfs —, hostPath, downwardAPI, projected
ServiceAccount tokens from the TokenRequest API); the environment (value, fieldRef, secretKeyRef,
configMapKeyRef, resourceFieldRef, envFrom, $(VAR)); each container as PID 1 of its own namespaces
(container.py), with its image taken from the image map (other images wait in ErrImagePull); status
(phase, conditions, container states with exit codes, reasons and termination messages), readiness and
liveness probes, restartPolicy with back-off, and graceful deletion (SIGTERM to PID 1, SIGKILL after the
grace period, then the final delete with grace 0).

Fault injection over a small HTTP API on 127.0.0.1 (its port is written to STATE/control-port):
POST /kill {namespace, pod, container, signal}, POST /oom {namespace, pod, container}, POST /lose (the
node stops heartbeating and reporting, and its pods die unreported); GET /pods.

This module is the command line; the node is in these modules:

    agent.py          NodeAgent: registration, Lease heartbeats, pods → workers, Events, faults, the main loop
    reflector.py      list-then-watch of a collection (the node's pods, Services, EndpointSlices)
    pod_worker.py     PodWorker: one pod's life, from the sandbox to the final delete
    volumes.py        the pod's volumes as host directories
    runtime.py        Container; starting one through container.py, recording its exit
    probes.py         readiness and liveness probes
    control.py        the control HTTP API above
    kubelet_rules.py  the kubelet's decisions as pure functions (images.py: what an image is)
    local_node.py     LocalNode, the test side: starts this process and talks to it (re-exported here)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .agent import NodeAgent
from .client import Kube
from .local_node import LocalNode
from .netns import Network

__all__ = ["LocalNode", "NodeAgent", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.node")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--network", required=True, help="the Network as JSON (netns.Network.to_json)")
    parser.add_argument("--state", required=True)
    parser.add_argument("--images", required=True, help="a JSON file: image or repository → kubelet_rules.Image")
    parser.add_argument("--backoff", type=float, default=10.0, help="the first restart back-off, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    import urllib3

    urllib3.disable_warnings()  # probes of https endpoints do not verify, as the kubelet's do not
    agent = NodeAgent(Kube(args.kubeconfig), args.name, args.index, Network.from_json(args.network), Path(args.state),
                      json.loads(Path(args.images).read_text()), backoff=args.backoff)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
