"""Checkpoints: torch.distributed.checkpoint (DCP) to a local directory or S3, asynchronous, committed
atomically, kept to the newest `keep`.

A checkpoint is `step-NNNNNNNNN/` under the checkpoint URI. Each save attempt writes into its own
`step-NNNNNNNNN/a-<id>/` (so a second writer of the same step can never overwrite the first's
objects); every rank writes its shards there with DCP; when DCP reports that all ranks succeeded
(its metadata is written last by rank 0), rank 0 writes `trainer_state.json` and finally
`step-NNNNNNNNN/COMMITTED` — a manifest of every object with its size and checksum (S3's ETag; a
CRC32 locally) and the attempt, step, world size and model/tokenizer fingerprints — with an exclusive
write (`If-None-Match: *` on S3, a hard link locally), so two writers can never both commit one step.
Only committed checkpoints whose objects all match the manifest (sizes, and checksums for the one
resumed from) are ever loaded, so a crash, a kill -9, a network fault mid-save or an object changed
after its commit leaves the previous committed checkpoint as the one that resumes.

Saves are asynchronous by default: the caller is blocked only while state is copied to host memory;
the write (and the commit) runs in a background thread on a separate gloo process group. At most one
save is in flight: the next one waits for it. DCP stores tensors by name and global shape, so a
checkpoint saved by N processes loads into M, into FSDP2 or DDP alike.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from kubetrain_api.config import S3Spec, TrainerConfig
from kubetrain_api.contract import ProgressCheckpoint, checkpoint_catalogue
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import ConfigError, concurrent_writer, first_cause
from .local_writer import LocalWriter
from .s3_reader import S3Reader
from .s3_writer import S3Writer
from .storage import AlreadyExists, LocalStore, S3Store, Store

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    """A checkpoint's directory under the checkpoint URI (zero-padded: listings sort by step)."""
    return f"step-{step:09d}"


_STEP_DIR = re.compile(r"^step-(\d{9})/")  # the inverse of step_dir_name, on listed keys


def checkpoint_uri(cfg: TrainerConfig, output: Path) -> str:
    """Where a run's checkpoints go: checkpoint.uri, else `checkpoints/` beside the run's other output."""
    return cfg.checkpoint.uri or str(output / "checkpoints")


@dataclass
class SaveResult:
    step: int
    ok: bool
    blocked_seconds: float
    total_seconds: float = 0.0
    bytes_written: int = 0
    error: str | None = None
    committed_at: float | None = None  # the commit's time (unix seconds), on rank 0


@dataclass
class _InFlight:
    step: int
    started: float
    blocked: float
    key: str
    done: threading.Event = field(default_factory=threading.Event)
    result: SaveResult | None = None


class CheckpointManager:
    def __init__(self, store: Store, keep: int, rank: int, fingerprints: dict[str, str],
                 s3: S3Spec | None = None, process_group: Any = None,
                 on_result: Callable[[SaveResult], None] | None = None):
        self.store, self.keep, self.rank, self.fingerprints = store, keep, rank, fingerprints
        self.s3 = s3 or S3Spec()
        self.process_group = process_group
        self.on_result = on_result
        self.consecutive_failures = 0
        # Set (on rank 0) when another writer committed a step this one was saving: the run stops at its next
        # save (Trainer.save) rather than after maxConsecutiveFailures saves that cannot succeed.
        self.writer_conflict: str | None = None
        # Rank 0's catalogue of the committed checkpoints retention keeps (/progress, the final report).
        self.catalogue: list[ProgressCheckpoint] = []
        self.damaged: list[int] = []  # committed steps newer than the last latest() that it skipped as damaged
        self._inflight: _InFlight | None = None
        self._writer: Any = None
        self._preparing: threading.Thread | None = None

    # -- discovery ---------------------------------------------------------------------------------
    def _objects(self) -> dict[str, int]:
        return self.store.list("")

    def committed_steps(self) -> list[int]:
        return sorted(int(m.group(1)) for key in self._objects() if (m := _STEP_DIR.match(key))
                      and key.endswith("/" + MARKER))

    def latest(self) -> int | None:
        """The newest committed checkpoint whose objects all match its manifest: sizes for every candidate
        (from one listing), then content checksums for the one chosen. The newer ones it skips are recorded
        in `damaged`. A storage error is raised, never taken for damage: the start fails (retryably, if it is
        transient) rather than resume from an older step while a good newer one exists."""
        objects = self._objects()
        self.damaged = []
        for step in reversed(self.committed_steps()):
            try:
                marker = json.loads(self.store.get(f"{step_dir_name(step)}/{MARKER}"))
                problem = self._mismatch(step, marker, objects)
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"unreadable manifest: {type(exc).__name__}: {exc}"
            if problem is None:
                return step
            log.warning("checkpoint %s is damaged (%s); skipping it", step, problem)
            self.damaged.append(step)
        return None

    def load_catalogue(self, resumed: int | None) -> None:
        """Rank 0 at start: the catalogue as storage holds it, up to the step resumed from (a newer one was
        skipped as damaged); the times from the manifests (one GET per listed checkpoint)."""
        entries: list[ProgressCheckpoint] = []
        steps = [s for s in self.committed_steps() if resumed is not None and s <= resumed]
        for step in steps[-self.keep:]:
            try:
                when = float(json.loads(self.store.get(f"{step_dir_name(step)}/{MARKER}"))["time"])
            except (ValueError, KeyError, TypeError, OSError):
                continue  # an unreadable (or pre-catalogue) manifest: not listed
            entries.append({"step": step, "uri": self.store.child_uri(step_dir_name(step)), "time": when})
        self.catalogue = checkpoint_catalogue(entries, self.keep)

    def _mismatch(self, step: int, marker: dict[str, Any], objects: dict[str, int], content: bool = True) -> str | None:
        """Why the stored objects differ from the manifest (missing, resized, changed: by content checksums
        unless `content` is False), or None."""
        prefix = step_dir_name(step) + "/"
        files = {name: entry if isinstance(entry, dict) else {"size": entry}  # manifests before checksums
                 for name, entry in marker["files"].items()}
        for name, entry in files.items():
            if objects.get(prefix + name) != entry["size"]:
                return f"{name} is missing or resized"
        if content and any("checksum" in entry for entry in files.values()):
            sums = self.store.checksums(f"{prefix}{marker['attempt']}/")
            for name, entry in files.items():
                if "checksum" in entry and sums.get(prefix + name) != entry["checksum"]:
                    return f"{name} has changed since it was committed (checksum {sums.get(prefix + name)}, " \
                           f"manifest {entry['checksum']})"
        return None

    def check_compatible(self, step: int) -> dict[str, Any]:
        marker: dict[str, Any] = json.loads(self.store.get(f"{step_dir_name(step)}/{MARKER}"))
        for key, expected in self.fingerprints.items():
            if marker.get(key) != expected:
                what = "model architecture" if key == "model" else key
                raise ConfigError(
                    f"checkpoint.uri: {self.store.child_uri(step_dir_name(step))} was written with a different "
                    f"{what} ({marker.get(key)} != {expected}); restore the original model/tokenizer settings, "
                    f"or set a new checkpoint.uri to start afresh")
        return marker

    def clean_up_after_crash(self) -> None:
        """Rank 0 at start, before any save: abort multipart uploads a killed writer left behind and
        delete uncommitted step directories (no writer is active yet, so none is in progress)."""
        aborted = self.store.abort_uploads("step-")  # checkpoints' only: never the export's, nor beside the prefix
        committed = set(self.committed_steps())
        objects = self._objects()
        debris = {int(m.group(1)) for key in objects if (m := _STEP_DIR.match(key))} - committed
        for step in debris:
            self.store.delete_prefix(step_dir_name(step) + "/")
        for step in committed:  # attempts that lost a commit race, or failed after another committed
            attempt = json.loads(self.store.get(f"{step_dir_name(step)}/{MARKER}")).get("attempt")
            for key in objects:
                parts = key.split("/")
                if key.startswith(step_dir_name(step) + "/a-") and len(parts) > 2 and parts[1] != attempt:
                    self.store.delete_prefix(f"{parts[0]}/{parts[1]}/")
        if aborted or debris:
            log.info("cleaned up after an interrupted save: %d upload(s) aborted, %d partial checkpoint(s) deleted",
                     aborted, len(debris))

    def discard_damaged(self) -> None:
        """Rank 0 at start, after `latest`: delete the committed checkpoints newer than the one resumed from
        that it found damaged, so that retention and the commits to come agree with latest: this run's commit
        of such a step would otherwise find the step taken and stop as if another writer had."""
        for step in self.damaged:
            log.warning("deleting checkpoint %d: it is damaged, and training resumes from an older one", step)
            self.store.delete_prefix(f"{step_dir_name(step)}/{MARKER}")  # un-commit first (see _retain)
            self.store.delete_prefix(step_dir_name(step) + "/")
        self.damaged = []

    # -- save ----------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Allocate the host staging buffers in a background thread, once the optimizer state exists (after
        the first step), so that no save is blocked by creating them. Saves wait for it if needed."""
        writer = self._writer_for()
        if writer.state_dict_cache is not None or self._preparing is not None or not optimizer.state:
            return
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        self._preparing = threading.Thread(target=writer.allocate, args=(state,), name="checkpoint-staging",
                                           daemon=True)
        self._preparing.start()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], asynchronous: bool = True) -> float:
        """Collective (every rank calls it at the same step). Starts a save and returns the seconds the
        caller was blocked: waiting for a previous save still in flight plus staging to host memory."""
        t0 = time.perf_counter()
        self.wait()
        if self._preparing is not None:
            self._preparing.join()
        attempt: list[Any] = [uuid.uuid4().hex[:12]]
        if dist.get_world_size(self.process_group) > 1:
            dist.broadcast_object_list(attempt, src=0, group=self.process_group)  # idle: no save in flight
        key = f"{step_dir_name(step)}/a-{attempt[0]}"
        payload = json.dumps(trainer_state)  # snapshot now: the loop keeps mutating its state
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        writer = self._writer_for()
        checkpoint_id = key if isinstance(self.store, S3Store) else str(self.store.root / key)  # type: ignore[attr-defined]
        inflight = _InFlight(step=step, started=t0, blocked=0.0, key=key)
        self._inflight = inflight
        if asynchronous:
            future = dcp.async_save(state, checkpoint_id=checkpoint_id, storage_writer=writer,
                                    process_group=self.process_group)
            inflight.blocked = time.perf_counter() - t0
            future.add_done_callback(  # type: ignore[union-attr]
                lambda f: self._finish(inflight, f, payload, writer))
        else:
            done: Future = Future()
            try:
                done.set_result(dcp.save(state, checkpoint_id=checkpoint_id, storage_writer=writer,
                                         process_group=self.process_group))
            except Exception as exc:
                done.set_exception(exc)
            inflight.blocked = time.perf_counter() - t0
            self._finish(inflight, done, payload, writer)
        return inflight.blocked

    def _writer_for(self) -> Any:
        if self._writer is None:  # one writer for the run: its staging buffers are reused by every save
            if isinstance(self.store, S3Store):
                self._writer = S3Writer(self.store, "")
            else:
                assert isinstance(self.store, LocalStore)
                self._writer = LocalWriter(str(self.store.root))
        return self._writer

    def _finish(self, inflight: _InFlight, future: Any, payload: str, writer: Any) -> None:
        """Runs when this rank's part of the save is done (in DCP's thread for async saves)."""
        step, key = inflight.step, inflight.key
        written = getattr(writer.fs, "bytes_written", 0)
        try:
            writer.fs.bytes_written = 0
            future.result()
            committed_at = None
            if self.rank == 0:  # DCP returns on rank 0 only after every rank's write succeeded
                self.store.put(f"{key}/{STATE}", payload.encode())
                committed_at = self._commit(step, key)
            result = SaveResult(step, True, inflight.blocked, time.perf_counter() - inflight.started, written,
                                committed_at=committed_at)
            if self.rank == 0:
                self._retain_quietly(step)  # after the commit is timed and can no longer be undone
                entry: ProgressCheckpoint = {"step": step, "uri": self.store.child_uri(step_dir_name(step)),
                                             "time": committed_at or time.time()}
                self.catalogue = checkpoint_catalogue([*self.catalogue, entry], self.keep)
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            message = f"{type(exc).__name__}: {first_cause(exc)}"
            log.error("checkpoint of step %d failed: %s", step, message)
            if self.rank == 0:
                self._discard(step, key)
            result = SaveResult(step, False, inflight.blocked, time.perf_counter() - inflight.started, written,
                                message)
        self.consecutive_failures = 0 if result.ok else self.consecutive_failures + 1
        inflight.result = result
        try:
            if self.on_result:
                self.on_result(result)
        finally:
            inflight.done.set()

    def _commit(self, step: int, attempt_key: str) -> float:
        """Write the step's manifest, exclusively; returns the commit's time (the manifest's)."""
        step_key = step_dir_name(step)
        objects = self.store.list(attempt_key + "/")
        sums = self.store.checksums(attempt_key + "/")
        files = {k[len(step_key) + 1:]: {"size": size, "checksum": sums[k]} for k, size in sorted(objects.items())}
        now = time.time()
        marker = {"step": step, "attempt": attempt_key[len(step_key) + 1:], "worldSize": dist.get_world_size(),
                  "time": now, "files": files, "objectSize": self.s3.object_size_bytes, **self.fingerprints}
        body = json.dumps(marker, indent=1).encode()
        try:
            self.store.put(f"{step_key}/{MARKER}", body, exclusive=True)
        except AlreadyExists:
            # Our own write, if a retry of it found the key taken (the first response was lost after S3 had
            # stored it): the stored manifest is then byte for byte ours, attempt id and time included.
            if self.store.get(f"{step_key}/{MARKER}") != body:
                other = json.loads(self.store.get(f"{step_key}/{MARKER}")).get("attempt")
                self.writer_conflict = str(concurrent_writer(
                    self.store.uri, f"step {step} was committed by attempt {other} while this run saved it as "
                                    f"{marker['attempt']}"))
                raise RuntimeError(f"step {step} was already committed by another writer; refusing to overwrite "
                                   f"it (two jobs share checkpoint.uri?)") from None
        return now

    def _committed_attempt(self, step: int) -> str | None:
        """The attempt the step's manifest names, None if the step has none."""
        marker_key = f"{step_dir_name(step)}/{MARKER}"
        if marker_key not in self.store.list(marker_key):
            return None
        return str(json.loads(self.store.get(marker_key)).get("attempt"))

    def _discard(self, step: int, attempt_key: str) -> None:
        """Remove a failed attempt's objects: its own directory only, never another writer's, and never one a
        manifest names (a commit whose response was lost is still a commit)."""
        try:
            if self._committed_attempt(step) == attempt_key.rsplit("/", 1)[1]:
                log.warning("checkpoint %d was committed although the save reported an error; keeping it", step)
                return
            self.store.abort_uploads(attempt_key + "/")
            self.store.delete_prefix(attempt_key + "/")
        except Exception as exc:  # the store may be unreachable; the next start cleans up
            log.warning("could not clean up the failed save %s (%s)", attempt_key, type(exc).__name__)

    def _retain_quietly(self, committed: int) -> None:
        """Retention never fails a committed save (and never deletes it): a store error is only logged,
        and the next commit (or restart) retries."""
        try:
            self._retain(committed)
        except Exception as exc:
            log.warning("could not delete old checkpoints (%s: %s); retrying after the next commit",
                        type(exc).__name__, str(exc)[:200])

    def _retain(self, committed_now: int) -> None:
        """Keep the newest `keep` intact committed checkpoints up to the one just committed (intact by the
        sizes latest() checks first: a damaged one never counts, and is deleted); delete the older ones and
        uncommitted debris older than it. Steps newer than it are not this run's (latest() skipped them, or
        another writer's) and stay. Runs only right after a commit, which is always kept."""
        objects = self._objects()
        committed = [s for s in self.committed_steps() if s <= committed_now]
        keep: set[int] = set()
        for step in reversed(committed):
            if len(keep) < self.keep and (step == committed_now or self._intact(step, objects)):
                keep.add(step)
        all_steps = {int(m.group(1)) for key in objects if (m := _STEP_DIR.match(key))}
        for step in sorted(s for s in all_steps if s <= committed_now):
            if step in committed and step not in keep:
                # Un-commit first: if deleting the data fails half way, what is left is never loadable.
                self.store.delete_prefix(f"{step_dir_name(step)}/{MARKER}")
            if step not in keep:
                self.store.delete_prefix(step_dir_name(step) + "/")

    def _intact(self, step: int, objects: dict[str, int]) -> bool:
        """Whether every object of the step's manifest is there at its size (no content checksums: retention
        runs after every commit, and a local store would read each checkpoint whole). A storage error is
        raised (retention is retried after the next commit), never taken for damage."""
        try:
            marker = json.loads(self.store.get(f"{step_dir_name(step)}/{MARKER}"))
            return self._mismatch(step, marker, objects, content=False) is None
        except (ValueError, KeyError, TypeError):
            return False

    def wait(self, timeout: float | None = None) -> SaveResult | None:
        """Block until the save in flight (if any) is finished and committed; None on timeout."""
        inflight = self._inflight
        if inflight is None:
            return None
        if not inflight.done.wait(timeout):
            return None
        self._inflight = None
        return inflight.result

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None and not self._inflight.done.is_set()

    # -- load ----------------------------------------------------------------------------------------
    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective: loads model and optimizer shards in place (any world size) and returns the
        trainer state (step, histories)."""
        marker = self.check_compatible(step)
        key = f"{step_dir_name(step)}/{marker['attempt']}"
        state: dict[str, Any] = {"model": get_model_state_dict(model),
                                 "optim": get_optimizer_state_dict(model, optimizer)}
        reader: Any
        if isinstance(self.store, S3Store):
            reader = S3Reader(self.store, key, int(marker.get("objectSize", self.s3.object_size_bytes)))
        else:
            assert isinstance(self.store, LocalStore)
            reader = FileSystemReader(str(self.store.root / key))
        t0 = time.perf_counter()
        dcp.load(state, storage_reader=reader)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        requests = getattr(reader, "requests", None)
        log.info("loaded checkpoint %d in %.2fs%s", step, time.perf_counter() - t0,
                 f" ({requests} ranged GETs by this rank)" if requests is not None else "")
        return dict(json.loads(self.store.get(f"{key}/{STATE}")))

