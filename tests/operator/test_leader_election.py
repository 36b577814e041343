"""High availability: Lease-based leader election (leader.py) and `kubetrain operator --leader-elect`.

The protocol is checked three ways: its pure decision rules; a Hypothesis-driven simulation of several
replicas racing over one Lease with an API that enforces resourceVersion as a real server does (never two
leaders at once, whatever the interleaving, crashes and clock advances); and three real operator processes
against a real API server (tests/cluster; one active, hand-over on SIGTERM and after a kill -9; the
played kubelet: tests/operator/conftest.py), one of them behind a proxy that turns into a black hole (it
accepts and never answers): it stops operating before the standby starts, on their own wall-clock records."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cluster.client import Kube, kubectl, ns_path
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_operator.leader import ElectionConfig, LeaderElector, Seen, decide, lease_spec, released_spec
from support import free_port, wait_until
from support.operator import Jobs, PlayedKubelet

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)


def lease(holder: str, renew: str = "t1", duration: int = 15, transitions: int = 0) -> dict[str, Any]:
    return {"metadata": {"name": "l", "resourceVersion": "1"},
            "spec": {"holderIdentity": holder, "renewTime": renew, "acquireTime": "t0",
                     "leaseDurationSeconds": duration, "leaseTransitions": transitions}}


# -- the rules ------------------------------------------------------------------------------------------

def test_no_lease_is_created_and_an_own_lease_is_renewed() -> None:
    assert decide(None, "me", None, 0.0, 15)[0] == "create"
    assert decide(lease("me"), "me", None, 0.0, 15)[0] == "renew"


def test_another_holder_is_waited_for_until_its_record_is_unchanged_for_the_lease_duration() -> None:
    decision, seen = decide(lease("other"), "me", None, 100.0, 15)
    assert decision == "wait" and seen == Seen(seen.record, 100.0)  # type: ignore[union-attr]
    assert decide(lease("other"), "me", seen, 114.9, 15)[0] == "wait"
    assert decide(lease("other"), "me", seen, 115.0, 15)[0] == "take"
    # a renewal resets the candidate's own timer: its clock, not the holder's timestamps, decides
    decision, renewed = decide(lease("other", renew="t2"), "me", seen, 114.0, 15)
    assert decision == "wait" and renewed is not None and renewed.at == 114.0
    assert decide(lease("other", renew="t2"), "me", renewed, 128.9, 15)[0] == "wait"
    # the Lease's own duration counts, not the candidate's default
    assert decide(lease("other", duration=5), "me", Seen((*seen.record[:-1], 5), 100.0), 105.0, 15)[0] == "take"


def test_a_released_lease_is_taken_at_once() -> None:
    assert decide(lease(""), "me", None, 0.0, 15)[0] == "take"


def test_lease_specs_for_each_decision() -> None:
    current = lease("old", transitions=3)
    taken = lease_spec("take", "me", 15, NOW, current)
    assert taken == {"holderIdentity": "me", "leaseDurationSeconds": 15, "acquireTime": "2026-11-28T12:00:00.000000Z",
                     "renewTime": "2026-11-28T12:00:00.000000Z", "leaseTransitions": 4}
    renewed = lease_spec("renew", "me", 15, NOW + dt.timedelta(seconds=2), {"spec": taken})
    assert renewed["renewTime"] == "2026-11-28T12:00:02.000000Z" and renewed["acquireTime"] == taken["acquireTime"]
    assert renewed["leaseTransitions"] == 4
    assert lease_spec("create", "me", 15, NOW)["leaseTransitions"] == 0
    assert released_spec({"spec": renewed}, NOW)["holderIdentity"] == ""


def test_election_timing_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="retry < renew deadline < lease duration"):
        ElectionConfig(lease_seconds=10, renew_deadline_seconds=12, retry_seconds=2)


# -- many replicas, one Lease, any interleaving ----------------------------------------------------------

class FakeLeases:
    """A Lease API with a real server's concurrency rules: create conflicts when the Lease exists, and a
    patch whose resourceVersion is not the current one conflicts (None, as Kube returns for a 409)."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("API server unreachable")

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        return copy.deepcopy(self.obj)

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self._check()
        if self.obj is not None:
            return None
        return self._store(body)

    async def patch_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self._check()
        if self.obj is None or body["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            return None
        return self._store({**self.obj, "spec": {**self.obj["spec"], **body["spec"]}})

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.obj = copy.deepcopy(body)
        self.obj["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.obj)


ACTIONS = st.lists(st.tuples(st.sampled_from(["try"] * 4 + ["advance"] * 3 + ["crash", "release", "outage"]),
                             st.integers(0, 2), st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 8.0])),
                   min_size=1, max_size=60)


def test_a_silent_holder_is_taken_over_only_after_its_renew_deadline() -> None:
    """The holder stops renewing at t=0 (it believes it leads until t=10); a standby that has watched the
    Lease since t=0 takes over at t=15, not before."""
    test_never_two_leaders_at_once.hypothesis.inner_test(  # type: ignore[attr-defined]
        [("try", 0, 0.0), ("try", 1, 0.0)] + [("advance", 0, 1.0), ("try", 1, 0.0)] * 16)

    async def scenario() -> list[float]:
        api, clock = FakeLeases(), [0.0]
        cfg = ElectionConfig(identity="a", lease_seconds=15, renew_deadline_seconds=10, retry_seconds=2)
        holder_ = LeaderElector(api, cfg, clock=lambda: clock[0])
        standby = LeaderElector(api, ElectionConfig(identity="b", lease_seconds=15, renew_deadline_seconds=10,
                                                    retry_seconds=2), clock=lambda: clock[0])
        assert await holder_.try_once()
        taken = []
        for _ in range(20):
            if await standby.try_once():
                taken.append(clock[0])
            clock[0] += 1.0
        return taken

    assert asyncio.run(scenario())[0] == 15.0


@settings(max_examples=400, deadline=None)
@given(ACTIONS)
def test_never_two_leaders_at_once(actions: list[tuple[str, int, float]]) -> None:
    """A replica believes it leads from a successful acquire/renew until `renew_deadline` later (what
    LeaderElector.hold enforces); at no moment may two replicas believe it."""

    async def scenario() -> None:
        api, clock = FakeLeases(), [0.0]
        cfg = {"lease_seconds": 15, "renew_deadline_seconds": 10.0, "retry_seconds": 2.0}
        electors = [LeaderElector(api, ElectionConfig(identity=f"r{i}", **cfg), clock=lambda: clock[0],  # type: ignore[arg-type]
                                  wall=lambda: NOW + dt.timedelta(seconds=clock[0])) for i in range(3)]
        believed_until = [-1.0, -1.0, -1.0]
        crashed = [False, False, False]
        for action, who, amount in actions:
            if action == "advance":
                clock[0] += amount
            elif action == "outage":
                api.down = not api.down
            elif action == "crash":
                crashed[who], believed_until[who] = True, -1.0
            elif crashed[who]:
                continue
            elif action == "release":
                electors[who].leading = believed_until[who] > clock[0]
                await electors[who].release()
                believed_until[who] = -1.0
            else:
                try:
                    if await electors[who].try_once():
                        believed_until[who] = clock[0] + cfg["renew_deadline_seconds"]
                    else:
                        believed_until[who] = -1.0  # it saw another holder: it steps down
                except ConnectionError:
                    pass  # keeps believing until its renew deadline, as hold() does
            leaders = [i for i in range(3) if believed_until[i] > clock[0]]
            assert len(leaders) <= 1, (leaders, api.obj)

    asyncio.run(scenario())


# -- real operator processes against a real API server ----------------------------------------------------

class Replica:
    """`kubetrain operator --leader-elect` as a process, as a Deployment's pod would run it."""

    def __init__(self, name: str, kubeconfig: Path, namespace: str, log: Path, extra: Sequence[str] = ()):
        self.name, self.port, self.log_path = name, free_port(), log
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": name, "POD_NAMESPACE": namespace,
               "KUBETRAIN_OPERATOR_RESYNC_SECONDS": "0.5"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetrain_cli", "operator", "-n", namespace, "--leader-elect",
             "--lease-duration", "3", "--metrics-port", str(self.port), "--liveness-port", "0", *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def leader_gauge(self) -> float | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("kubetrain_operator_leader "):
                return float(line.split()[1])
        return None

    def health(self) -> int | None:
        try:
            return int(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def operated(self, what: str) -> list[str]:
        """When this replica logged that it `started`/`stopped` operating (wall clock, RFC 3339 in UTC)."""
        return re.findall(rf" {what} operating at (\S+)", self.log_path.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code


def holder(kube: Kube, namespace: str) -> str:
    lease = kube.find(ns_path(namespace, "leases", "kubetrain-operator", group="coordination.k8s.io"))
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


async def gauge_is(replica: Replica, value: float | None = None) -> bool:
    """Whether the replica serves its leader gauge (with `value`, if given); scraped off the event loop."""
    got = await asyncio.get_running_loop().run_in_executor(None, replica.leader_gauge)
    return got is not None and (value is None or got == value)


async def stop(replica: Replica, sig: int = signal.SIGTERM) -> int:
    """Off the event loop: the played kubelet in this loop keeps finishing deletions meanwhile."""
    return int(await asyncio.get_running_loop().run_in_executor(None, replica.stop, sig))


@pytest.mark.asyncio
async def test_one_active_replica_hands_over_on_sigterm_and_after_a_crash(
        kube: Kube, namespace: str, kubelet: PlayedKubelet, control_plane: Any, tmp_path: Path) -> None:
    kubeconfig, jobs = Path(control_plane.kubeconfig), Jobs(kube, namespace)

    def workers() -> list[str]:
        return sorted(kubelet.pods())

    a = Replica("replica-a", kubeconfig, namespace, tmp_path / "a.log")
    try:
        await wait_until(lambda: holder(kube, namespace).startswith("replica-a_"), timeout=60, what="a to lead")
        b = Replica("replica-b", kubeconfig, namespace, tmp_path / "b.log")
        await wait_until(lambda: gauge_is(b), timeout=60, what="b's metrics")
        assert await gauge_is(b, 0.0) and await gauge_is(a, 1.0)

        jobs.create(jobs.manifest(workers={"nodes": 2, "procPerNode": 1}))
        await wait_until(lambda: workers() == ["job-worker-0", "job-worker-1"], timeout=60, what="a to create the pods")
        await kubelet.run_all()

        assert await stop(a) == 0  # SIGTERM: Kopf stops, the Lease is released
        await wait_until(lambda: holder(kube, namespace).startswith("replica-b_"), timeout=30, what="b to take over")
        await wait_until(lambda: gauge_is(b, 1.0), timeout=30, what="b's leader gauge")
        before = kubelet.uids()
        await asyncio.to_thread(kubectl, kubeconfig, "-n", namespace, "delete", "pod", "job-worker-1", "--wait=false")
        await wait_until(lambda: len(kubelet.uids()) == 2 and not set(kubelet.uids().values()) & set(before.values()),
                         timeout=60, what="b, now active, to relaunch the group for the deleted worker")

        c = Replica("replica-c", kubeconfig, namespace, tmp_path / "c.log")
        await wait_until(lambda: gauge_is(c, 0.0), timeout=60, what="c's metrics, on standby")
        await stop(b, signal.SIGKILL)  # a crash: nothing released; c waits out the lease duration, then leads
        await wait_until(lambda: holder(kube, namespace).startswith("replica-c_"), timeout=30, what="c to take over")
        await wait_until(lambda: gauge_is(c, 1.0), timeout=30, what="c's leader gauge")
        relaunched = kubelet.uids()
        await kubelet.run_all()
        await wait_until(jobs.phase_is("Running"), timeout=30, what="c to reconcile the job")
        assert workers() == ["job-worker-0", "job-worker-1"]  # adopted, not duplicated
        assert kubelet.uids() == relaunched
        assert jobs.status()["restarts"] == 1
        assert await stop(c) == 0
    finally:
        for name in ("a", "b", "c"):
            replica = locals().get(name)
            if isinstance(replica, Replica) and replica.proc.poll() is None:
                await stop(replica, signal.SIGKILL)
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in "abc")
    assert "Traceback" not in logs, logs[-3000:]


class BlackHoleProxy:
    """A TCP forwarder to the API server that can turn silent: from then on it still accepts connections
    and reads what it is sent, and forwards nothing either way (a half-open connection, a stuck proxy)."""

    def __init__(self, target: str):
        url = urlsplit(target)
        self.host, self.port, self.silent = url.hostname or "127.0.0.1", url.port or 443, False
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.silent:
            await self._pump(reader, None)
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers.append(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None) -> None:
        while data := await source.read(65536):
            if sink is not None and not self.silent:
                sink.write(data)
                await sink.drain()

    def kubeconfig(self, original: Path, path: Path) -> Path:
        config = yaml.safe_load(original.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://{self.host}:{self.listen_port}"  # the certificate names host
        path.write_text(yaml.safe_dump(config))
        return path

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


@pytest.mark.asyncio
async def test_a_leader_whose_api_server_stops_answering_stops_before_the_standby_starts(
        kube: Kube, namespace: str, control_plane: Any, llmtrainingjob_crd: str, tmp_path: Path) -> None:
    """Replica a leads through a proxy that then accepts and never answers; its renewals hang. It must stop
    operating at its renew deadline, before b (direct to the API server) takes the Lease over; c, a standby
    behind the same proxy, keeps running and reports unhealthy on /healthz."""
    proxy = await BlackHoleProxy(control_plane.server).start()
    through_proxy = proxy.kubeconfig(Path(control_plane.kubeconfig), tmp_path / "proxied-kubeconfig")
    a = Replica("replica-a", through_proxy, namespace, tmp_path / "a.log")
    replicas = [a]
    try:
        await wait_until(lambda: holder(kube, namespace).startswith("replica-a_"), timeout=60, what="a to lead")
        b = Replica("replica-b", Path(control_plane.kubeconfig), namespace, tmp_path / "b.log")
        c = Replica("replica-c", through_proxy, namespace, tmp_path / "c.log", extra=["--unhealthy-after", "1"])
        replicas += [b, c]
        await wait_until(lambda: gauge_is(b, 0.0), timeout=60, what="b on standby")
        await wait_until(lambda: gauge_is(c, 0.0), timeout=60, what="c on standby")
        assert c.health() == 200

        proxy.silent = True
        await wait_until(lambda: a.proc.poll() is not None, timeout=30, what="a to step down and exit")
        assert a.proc.returncode == 1  # lost leadership: the Deployment restarts it as a standby
        await wait_until(lambda: holder(kube, namespace).startswith("replica-b_"), timeout=30, what="b to take over")
        await wait_until(lambda: b.operated("started"), timeout=30, what="b to start operating")
        (a_started,), (a_stopped,), (b_started,) = a.operated("started"), a.operated("stopped"), b.operated("started")
        assert a_started < a_stopped < b_started  # never two replicas operating at once
        await wait_until(lambda: asyncio.to_thread(lambda: c.health() == 503), timeout=30, what="c unhealthy")
        assert c.proc.poll() is None and await stop(b) == 0
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                await stop(replica, signal.SIGKILL)
        await proxy.close()
