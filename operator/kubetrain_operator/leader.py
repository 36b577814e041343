"""High availability: one active operator among replicas, elected with a coordination.k8s.io/v1 Lease.

The same protocol as client-go's leader election, so it behaves as cluster operators expect: the holder
renews the Lease every `retry_seconds`; a candidate takes it over only when it has seen the Lease record
unchanged for `lease_seconds` by its *own* clock (no clock-skew assumptions between nodes), or when the
holder released it. Every write is a merge patch carrying the resourceVersion that was read (a
precondition: the API server applies it only to that version), so of two candidates racing for an
expired Lease exactly one wins (409 for the other). The
holder gives up leadership when it has not renewed for `renew_deadline_seconds` (< `lease_seconds`),
before anyone else may take over; the runner then stops Kopf and exits, and the pod restarts as a
standby. On a clean shutdown the holder releases the Lease so a standby takes over at once.

`decide` and `lease_spec` are pure; `LeaderElector` does the I/O.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Decision = Literal["create", "renew", "take", "wait"]


@dataclass(frozen=True)
class Seen:
    """The Lease record a candidate last saw, and when (its own monotonic clock) it first saw it."""

    record: tuple[Any, ...]
    at: float


def decide(lease: dict[str, Any] | None, identity: str, seen: Seen | None, now: float,
           default_seconds: float) -> tuple[Decision, Seen | None]:
    """What a candidate does with the Lease it just read (None: it does not exist)."""
    if lease is None:
        return "create", None
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    record = (holder, spec.get("renewTime"), spec.get("acquireTime"), spec.get("leaseTransitions"),
              spec.get("leaseDurationSeconds"))
    if seen is None or seen.record != record:
        seen = Seen(record, now)
    if holder == identity:
        return "renew", seen
    duration = spec.get("leaseDurationSeconds") or default_seconds
    if not holder or now - seen.at >= float(duration):
        return "take", seen
    return "wait", seen


def micro_time(at: dt.datetime) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, in UTC."""
    return at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_spec(decision: Decision, identity: str, lease_seconds: int, now: dt.datetime,
               current: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Lease spec to write for `decision` ("create", "renew" or "take"; "release" hands it back)."""
    spec = dict((current or {}).get("spec") or {})
    stamp = micro_time(now)
    if decision == "renew":
        spec.update(renewTime=stamp, leaseDurationSeconds=lease_seconds)
        return spec
    transitions = int(spec.get("leaseTransitions") or 0) + (1 if decision == "take" else 0)
    return {"holderIdentity": identity, "leaseDurationSeconds": lease_seconds, "acquireTime": stamp,
            "renewTime": stamp, "leaseTransitions": transitions}


def released_spec(current: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """What the holder writes on a clean shutdown: no holder, so a standby takes over at once."""
    spec = dict(current.get("spec") or {})
    spec.update(holderIdentity="", renewTime=micro_time(now), leaseDurationSeconds=1)
    return spec


class LeaseAPI(Protocol):
    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None: ...
    async def patch_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None: ...


def default_identity() -> str:
    """The pod name (downward API) when there is one; unique per process either way."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_namespace() -> str:
    """The operator's own namespace: $POD_NAMESPACE, else the service account's, else `default`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


@dataclass
class ElectionConfig:
    name: str = "kubetrain-operator"
    namespace: str = "default"
    identity: str = ""
    lease_seconds: int = 15
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        self.identity = self.identity or default_identity()
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError("leader election needs 0 < retry < renew deadline < lease duration")


class LeaderElector:
    def __init__(self, api: LeaseAPI, config: ElectionConfig,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)):
        self.api, self.config, self.clock, self.wall = api, config, clock, wall
        self.leading = False
        self.observations = 0  # Lease reads so far (tests wait on it instead of sleeping)
        self.renewed_at = 0.0  # clock() when the last successful acquire or renewal was sent
        self._seen: Seen | None = None
        self._lease: dict[str, Any] | None = None

    async def try_once(self) -> bool:
        """Read the Lease and create, renew or take it if this candidate may; True when it holds it now."""
        cfg = self.config
        lease = await self.api.read_lease(cfg.namespace, cfg.name)
        self.observations += 1
        decision, self._seen = decide(lease, cfg.identity, self._seen, self.clock(), cfg.lease_seconds)
        if decision == "wait":
            self._lease = lease
            return False
        spec = lease_spec(decision, cfg.identity, cfg.lease_seconds, self.wall(), lease)
        if decision == "create":
            written = await self.api.create_lease(cfg.namespace, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": cfg.name, "namespace": cfg.namespace}, "spec": spec})
        else:
            assert lease is not None
            body = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]}, "spec": spec}
            written = await self.api.patch_lease(cfg.namespace, cfg.name, body)
        if written is None:  # someone else created or changed it first
            return False
        self._lease = written
        if decision != "renew":
            log.info("leader election: %s now holds lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        return True

    async def acquire(self) -> None:
        """Wait until this candidate holds the Lease."""
        while not self.leading:
            started = self.clock()
            try:  # bounded: a read that never returns must not keep a candidate from retrying
                self.leading = await asyncio.wait_for(self.try_once(), self.config.renew_deadline_seconds)
            except Exception as exc:  # the API may be briefly unreachable: keep trying
                log.warning("leader election: %s", _describe(exc))
            if self.leading:
                self.renewed_at = started
            else:
                await asyncio.sleep(self.config.retry_seconds)

    async def hold(self) -> None:
        """Renew every retry period; return when leadership is lost: another holder, or no successful
        renewal within the renew deadline. Each renewal is cut off at that deadline, so one that hangs (a
        half-open connection) cannot keep this replica leading past it. A renewal counts from when it
        was sent, not when its answer came: the server wrote the Lease after that, so a standby (which
        counts from when it saw the write) cannot take over before this replica's deadline has passed."""
        cfg = self.config
        while True:  # wakes at the deadline at the latest, so stepping down is never late by a retry period
            await asyncio.sleep(min(cfg.retry_seconds, max(self.renewed_at + cfg.renew_deadline_seconds
                                                           - self.clock(), 0.0)))
            started = self.clock()
            left = self.renewed_at + cfg.renew_deadline_seconds - started
            if left <= 0:
                log.error("leader election: not renewed for %.1fs; stepping down", cfg.renew_deadline_seconds)
                break
            try:
                if await asyncio.wait_for(self.try_once(), left):
                    self.renewed_at = started
                    continue
                log.error("leader election: the lease was taken over; stepping down")
                break
            except Exception as exc:
                log.warning("leader election: renewal failed: %s", _describe(exc))
        self.leading = False

    async def release(self) -> None:
        """Hand the Lease back (clean shutdown), if this candidate still holds it."""
        if not self.leading or self._lease is None:
            return
        self.leading = False
        try:
            body = {"metadata": {"resourceVersion": self._lease["metadata"]["resourceVersion"]},
                    "spec": released_spec(self._lease, self.wall())}
            await asyncio.wait_for(self.api.patch_lease(self.config.namespace, self.config.name, body),
                                   self.config.renew_deadline_seconds)
        except Exception as exc:  # a standby takes over after the lease duration anyway
            log.warning("leader election: could not release the lease: %s", _describe(exc))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # asyncio.wait_for's TimeoutError has no message


async def lead(elector: LeaderElector, operate: Callable[[asyncio.Event], Awaitable[None]]) -> bool:
    """Become the leader, then run `operate(stop_flag)` until it returns (True) or leadership is lost
    (False: the flag is set, and `operate` is given until a standby may take over to finish, then
    cancelled). The Lease is released when `operate` ends normally."""
    await elector.acquire()
    identity = elector.config.identity
    # Both moments on the wall clock, for whoever checks that two replicas never operated at once.
    log.info("leader election: %s started operating at %s", identity, micro_time(elector.wall()))
    stop = asyncio.Event()
    holding = asyncio.ensure_future(elector.hold())
    operating = asyncio.ensure_future(operate(stop))
    try:
        await asyncio.wait({holding, operating}, return_when=asyncio.FIRST_COMPLETED)
        if operating.done():
            operating.result()
            return True
        stop.set()
        cfg = elector.config
        # A standby takes over no sooner than lease_seconds after the last renewal was sent; the renew
        # deadline has passed already: half of what is left of the lease duration to stop cleanly.
        margin = (cfg.lease_seconds - cfg.renew_deadline_seconds) / 2
        done, _ = await asyncio.wait({operating}, timeout=margin)
        if not done:
            log.error("leader election: the controllers did not stop within %.1fs; cancelling them", margin)
        return False
    finally:
        holding.cancel()
        operating.cancel()
        await asyncio.gather(holding, operating, return_exceptions=True)
        log.info("leader election: %s stopped operating at %s", identity, micro_time(elector.wall()))
        await elector.release()
