"""The local node's pod lifecycle (tests/cluster/pod_worker.py, probes.py) on the real control plane: readiness
and liveness probes, restart policies with back-off, init containers, termination messages, unknown
images, and graceful deletion."""

from __future__ import annotations

from typing import Any

from support import wait_for

from cluster.client import Kube
from cluster.pod_helpers import IMAGE, alive, condition, container_state, create, get, pod_manifest, python, wait_phase


def test_readiness_probe_and_restart_policy(local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    web = pod_manifest("web", python("""
        import http.server, os, signal, sys
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        http.server.HTTPServer(("0.0.0.0", 8000), http.server.SimpleHTTPRequestHandler).serve_forever()
        """), readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        ports=[{"name": "http", "containerPort": 8000}])
    create(kube, ns, web)
    pod = wait_for(lambda: (p := get(kube, ns, "web")) and condition(p, "Ready") == "True" and p, timeout=60,
                   what="Ready")
    assert container_state(pod)["ready"] is True and pod["status"]["phase"] == "Running"
    # OnFailure: a failing container is restarted with back-off, restartCount counts, lastState keeps the exit
    flaky = pod_manifest("flaky", ["sh", "-c", "test -e /tmp/again && exit 0; touch /tmp/again; exit 7"],
                         restart="OnFailure")
    create(kube, ns, flaky)
    pod = wait_phase(kube, ns, "flaky", "Succeeded", timeout=90)
    status = container_state(pod)
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0


def test_a_failing_liveness_probe_restarts_the_container_under_restart_policy_always(
        local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    # Alive while /tmp/alive exists; the first run removes it after a moment, the restarted run keeps it
    # (/tmp is the pod's, so it survives the restart: the marker tells the runs apart).
    body = pod_manifest("liveness", ["sh", "-c", "if [ -e /tmp/second ]; then touch /tmp/alive; exec sleep 1000; fi; "
                                     "touch /tmp/alive /tmp/second; sleep 2; rm /tmp/alive; exec sleep 1000"],
                        restart="Always", grace=1,
                        livenessProbe={"exec": {"command": ["test", "-e", "/tmp/alive"]}, "periodSeconds": 1,
                                       "failureThreshold": 2})
    create(kube, ns, body)
    pod = wait_for(lambda: (p := get(kube, ns, "liveness")) and container_state(p).get("restartCount") == 1 and
                   "running" in container_state(p)["state"] and p, timeout=90, what="a liveness restart")
    last = container_state(pod)["lastState"]["terminated"]
    assert last["exitCode"] == 137  # sleep as PID 1 ignores SIGTERM: killed after the 1 s grace period
    assert pod["status"]["phase"] == "Running"
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=liveness")
    assert {"Unhealthy", "Killing", "BackOff"} <= {e["reason"] for e in events}


def test_fallback_to_logs_init_containers_and_unknown_images(local_cluster: Any, kube: Kube, namespace: str) -> None:
    ns = namespace
    create(kube, ns, pod_manifest("crash", ["sh", "-c", "echo first line; echo the reason >&2; exit 3"],
                                  terminationMessagePolicy="FallbackToLogsOnError"))
    body = pod_manifest("with-init", ["sh", "-c", "cat /work/ready > /dev/termination-log"],
                        volumeMounts=[{"name": "w", "mountPath": "/work"}])
    body["spec"]["initContainers"] = [{"name": "setup", "image": IMAGE,
                                       "command": ["sh", "-c", "echo ok > /work/ready"],
                                       "volumeMounts": [{"name": "w", "mountPath": "/work"}]}]
    body["spec"]["volumes"] = [{"name": "w", "emptyDir": {}}]
    create(kube, ns, body)
    create(kube, ns, {**pod_manifest("unknown", ["true"]), "spec": {
        "restartPolicy": "Never", "containers": [{"name": "main", "image": "registry.invalid/nothing:1"}]}})
    crash = wait_phase(kube, ns, "crash", "Failed")
    term = container_state(crash)["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert term["message"].splitlines() == ["first line", "the reason"]
    init = wait_phase(kube, ns, "with-init", "Succeeded")
    assert container_state(init, "setup")["state"]["terminated"]["exitCode"] == 0
    assert container_state(init)["state"]["terminated"]["message"] == "ok\n"
    unknown = wait_for(lambda: (p := get(kube, ns, "unknown")) and p["status"].get("containerStatuses") and
                       container_state(p)["state"].get("waiting", {}).get("reason") in ("ErrImagePull",
                                                                                        "ImagePullBackOff") and p,
                       timeout=60, what="ErrImagePull")
    assert unknown["status"]["phase"] == "Pending"


def test_graceful_deletion_sigterm_then_sigkill_and_the_final_delete(local_cluster: Any, kube: Kube,
                                                                     namespace: str) -> None:
    ns = namespace
    polite = pod_manifest("polite", python("""
        import signal, sys, time
        def term(*a):
            open("/dev/termination-log", "w").write("got SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        open("/tmp/handling-sigterm", "w").close()
        while True:
            time.sleep(0.05)
        """), grace=30, readinessProbe={"exec": {"command": ["test", "-e", "/tmp/handling-sigterm"]},
                                      "periodSeconds": 1})
    stubborn = pod_manifest("stubborn", ["sleep", "1000"], grace=2)  # PID 1 without a handler ignores SIGTERM
    stubborn["metadata"]["finalizers"] = ["kubetrain.io/test-hold"]
    for body in (polite, stubborn):
        create(kube, ns, body)
    for name in ("polite", "stubborn"):  # Ready: PID 1 has its SIGTERM handler (else SIGTERM would be ignored)
        wait_for(lambda n=name: (p := get(kube, ns, n)) and condition(p, "Ready") == "True", timeout=60,
                 what=f"{name} ready")
    nodes = {n: local_cluster.node_of(kube, ns, n) for n in ("polite", "stubborn")}
    pids = {n: nodes[n].pod(ns, n)["containers"]["main"]["pid"] for n in nodes}
    kube.delete(f"/api/v1/namespaces/{ns}/pods/polite")
    kube.delete(f"/api/v1/namespaces/{ns}/pods/stubborn")
    # Terminating: the API server keeps them until the node's final delete
    assert get(kube, ns, "polite") is None or get(kube, ns, "polite")["metadata"].get("deletionTimestamp")  # type: ignore[index]
    wait_for(lambda: get(kube, ns, "polite") is None, timeout=30, what="polite gone after SIGTERM")
    assert not alive(pids["polite"])
    # The stubborn one is killed after its 2 s grace period; its finalizer keeps the object, with the exit
    held = wait_for(lambda: (p := get(kube, ns, "stubborn")) and "terminated" in container_state(p)["state"] and p,
                    timeout=30, what="stubborn killed")
    assert container_state(held)["state"]["terminated"]["exitCode"] == 137
    assert held["status"]["phase"] == "Failed"
    assert not alive(pids["stubborn"])
    kube.patch(f"/api/v1/namespaces/{ns}/pods/stubborn", {"metadata": {"finalizers": None}})
    wait_for(lambda: get(kube, ns, "stubborn") is None, timeout=30, what="stubborn gone")


def test_a_liveness_probe_failing_fewer_times_than_its_threshold_does_not_restart(local_cluster: Any, kube: Kube,
                                                                                namespace: str) -> None:
    ns = namespace
    # Not alive for its first 1.5 s (probes every second, five failures allowed), alive after: never restarted
    alive = {"exec": {"command": ["test", "-e", "/tmp/alive"]}, "periodSeconds": 1}
    body = pod_manifest("slow-start", ["sh", "-c", "sleep 1.5; touch /tmp/alive; exec sleep 1000"], restart="Always",
                        grace=1, livenessProbe={**alive, "failureThreshold": 5}, readinessProbe=alive)
    create(kube, ns, body)
    pod = wait_for(lambda: (p := get(kube, ns, "slow-start")) and condition(p, "Ready") == "True" and p, timeout=60,
                   what="slow-start Ready")
    status = container_state(pod)
    assert status["restartCount"] == 0 and "running" in status["state"], status
    events = kube.list(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=slow-start")
    assert "Killing" not in {e["reason"] for e in events}
