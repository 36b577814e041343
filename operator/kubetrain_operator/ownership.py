"""Which objects belong to a job: its controller ownerReference's uid says so, never the name or labels alone.

Names are fixed (`<job>-worker-<i>`, `<job>-config`, the Service `<job>`), so an object of that name can be
 - ours: controlled by this job (its uid);
 - stale: left by an earlier job of the same name, i.e. it carries our labels and is controlled by an
   LLMTrainingJob of that name with another uid (garbage collection still pending) or by nothing
   (`kubectl delete --cascade=orphan`). A re-created job must not inherit it (the old pods' exits, the old
   config): stale pods are deleted and their names waited for; a stale ConfigMap or Service is taken over
   (adopted: its controller reference replaced, with a uid precondition, as ReplicaSets adopt orphans);
 - foreign: anything else (made by a user or another controller). It is never patched, adopted or deleted:
   the job reports the conflict (NameConflict) and waits for the name, so naming a job `x` cannot overwrite
   somebody's `x-config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetrain_api.manifest import API_VERSION, KIND

from .coerce import as_dict, as_list, as_str
from .render import LABEL_JOB, MANAGED_BY, JobRef, owner_reference

Ownership = Literal["ours", "stale", "foreign"]
MANAGER_LABEL = "app.kubernetes.io/managed-by"


@dataclass(frozen=True)
class Owner:
    """An object's controller ownerReference."""

    api_version: str
    kind: str
    name: str
    uid: str


def controller_of(meta: Any) -> Owner | None:
    for ref in as_list(as_dict(meta).get("ownerReferences")):
        ref = as_dict(ref)
        if ref.get("controller") is True:
            return Owner(as_str(ref.get("apiVersion")) or "", as_str(ref.get("kind")) or "",
                         as_str(ref.get("name")) or "", as_str(ref.get("uid")) or "")
    return None


def managed_by_us(meta: Any, job_name: str) -> bool:
    labels = as_dict(as_dict(meta).get("labels"))
    return labels.get(LABEL_JOB) == job_name and labels.get(MANAGER_LABEL) == MANAGED_BY[MANAGER_LABEL]


def ownership(controller: Owner | None, managed: bool, job: JobRef) -> Ownership:
    """Whose an object named for `job` is (see the module docstring). A job without a uid (never from a real
    API server) owns by name."""
    if not job.uid or (controller is not None and controller.uid == job.uid):
        return "ours"
    earlier_job = controller is None or (controller.kind == KIND and controller.api_version == API_VERSION
                                         and controller.name == job.name)
    return "stale" if managed and earlier_job else "foreign"


def object_ownership(obj: Any, job: JobRef) -> Ownership:
    meta = as_dict(as_dict(obj).get("metadata"))
    return ownership(controller_of(meta), managed_by_us(meta, job.name), job)


def adoption_patch(obj: Any, job: JobRef) -> dict[str, Any]:
    """The merge patch that makes a stale object this job's: our controller reference in place of the old one,
    applied only to that object (its uid as precondition: a replaced object is not adopted by mistake)."""
    meta = as_dict(as_dict(obj).get("metadata"))
    others = [r for r in as_list(meta.get("ownerReferences")) if as_dict(r).get("controller") is not True]
    return {"metadata": {"uid": meta.get("uid"), "ownerReferences": [*others, owner_reference(job)]}}


def conflict_message(kind: str, obj: Any, job: JobRef) -> str:
    meta = as_dict(as_dict(obj).get("metadata"))
    owner = controller_of(meta)
    by = f"controlled by {owner.kind} {owner.name}" if owner is not None else "not made by kubetrain"
    return (f"{kind} {job.namespace}/{meta.get('name')} exists and is not this job's ({by}); the job needs that "
            f"name: delete or rename that {kind}, or give the job another name")
