"""The local node's view of the API: a list-then-watch reflector (what client-go's informers do), one per
collection the node follows (its pods, every Service, every EndpointSlice)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import requests

from .client import ApiError, Kube

log = logging.getLogger("local-node")


class Reflector(threading.Thread):
    """List, then watch, a collection; keeps `objects` (by uid) current and calls `on_change(event, obj)`.
    Relists after an expired resourceVersion or any error."""

    def __init__(self, kube: Kube, path: str, on_change: Any, stop: threading.Event, **params: Any):
        super().__init__(daemon=True, name=f"reflector {path}")
        self.kube, self.path, self.params, self.on_change, self.stop = kube, path, params, on_change, stop
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()

    def _notify(self, event: str, obj: dict[str, Any]) -> None:
        try:
            self.on_change(event, obj)
        except Exception:
            log.exception("%s: handling %s %s", self.path, event, obj["metadata"].get("name"))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                listing = self.kube.get(self.path, **self.params)
                fresh = {o["metadata"]["uid"]: o for o in listing.get("items") or []}
                for uid, obj in list(self.objects.items()):
                    if uid not in fresh:
                        del self.objects[uid]
                        self._notify("DELETED", obj)
                for uid, obj in fresh.items():
                    self.objects[uid] = obj
                    self._notify("MODIFIED", obj)
                self.synced.set()
                rv = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    for event in self.kube.watch(self.path, rv, timeout_seconds=30, **self.params):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), str(obj.get("reason")), str(obj.get("message")))
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        uid = obj["metadata"]["uid"]
                        if event["type"] == "DELETED":
                            self.objects.pop(uid, None)
                        else:
                            self.objects[uid] = obj
                        self._notify(event["type"], obj)
                        if self.stop.is_set():
                            return
            except (ApiError, requests.RequestException, ValueError, KeyError) as exc:
                if not self.stop.is_set():
                    log.debug("%s: %s; listing again", self.path, exc)
                    self.stop.wait(0.5)
