"""preparation.py and its objects in render.py: which jobs need data preparation and how it runs (Jobs on
shared storage, or the single worker's init container), the stage Jobs, the workers' config pointing at the
prepared location, the refusals validate.py gives, and what is observed of the stage's Jobs and pods."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubetrain_api.manifest import JobSpec
from kubetrain_api.preparation import is_raw_text, prepared_location
from kubetrain_operator import preparation
from kubetrain_operator.render import JobRef, render_configmap, render_objects, render_pod, render_stage_jobs
from kubetrain_operator.validate import validate_job
from support import spec_dict

REF = JobRef("tiny", "ml", "uid-7")
RAW = {"tokenizer": {"path": None, "train": {"vocabSize": 512}},
       "data": {"train": "corpus://shakespeare", "validation": None, "validationSplit": 0.05}}


def spec(**sections: Any) -> JobSpec:
    return JobSpec.model_validate(spec_dict(**{**RAW, **sections}))


def test_what_needs_preparation_is_read_from_the_spec_alone() -> None:
    assert [is_raw_text(p) for p in ("corpus://shakespeare", "s3://b/raw/*.txt", "/data/books.jsonl",
                                     "s3://b/one.parquet", "s3://b/prepared/train/", "/data/train")] == [
        True, True, True, True, False, False]
    prepared = JobSpec.model_validate(spec_dict())
    assert preparation.mode(prepared) == "none"
    assert json.loads(render_configmap(REF, prepared)["data"]["config.json"]) == prepared.trainer_config().to_wire()
    assert render_stage_jobs(REF, prepared) == []
    # A tokenizer to learn means raw text, even under a plain prefix.
    s = spec(data={"train": "s3://b/raw/", "validation": None, "validationSplit": 0.05})
    assert preparation.mode(s) == "job"


def test_with_shared_storage_the_stage_is_a_job_owned_by_the_llmtrainingjob_and_workers_read_its_output() -> None:
    s = spec(checkpoint={"uri": "s3://bucket/jobs/tiny/"}, s3={"credentialsSecret": "s3-creds"},
             workers={"nodes": 2, "resources": {"limits": {"nvidia.com/gpu": 8, "cpu": "4"}},
                      "podTemplate": {"nodeSelector": {"pool": "cpu"}, "env": [{"name": "X", "value": "1"}]}})
    location = prepared_location("s3://bucket/jobs/tiny/prepared/", s.trainer_config())
    assert preparation.location(s, "/out") == location and location.startswith("s3://bucket/jobs/tiny/prepared/")
    objects = render_objects(REF, s)
    assert [o["kind"] for o in objects] == ["Service", "ConfigMap", "Job", "Pod", "Pod"]
    job = objects[2]
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == "tiny-prepare"
    assert job["metadata"]["labels"]["kubetrain.io/job-name"] == "tiny"
    assert job["metadata"]["labels"]["kubetrain.io/role"] == "prepare"
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-7"
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 1, 1)
    assert js["podFailurePolicy"]["rules"][0] == {"action": "FailJob", "onExitCodes": {
        "containerName": "prepare", "operator": "In", "values": [2]}}
    pod = js["template"]
    assert pod["metadata"]["labels"]["kubetrain.io/role"] == "prepare"
    assert "kubetrain.io/replica-index" not in pod["metadata"]["labels"]
    assert pod["spec"]["nodeSelector"] == {"pool": "cpu"} and pod["spec"]["restartPolicy"] == "Never"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "kubetrain_trainer.prepare_stage", "--config", "/etc/kubetrain/stage.json",
                            "--to", location, "--step", "all", "--workdir", "/var/run/kubetrain/output/stage"]
    assert c["image"] == s.image and c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "X", "value": "1"} in c["env"]
    assert c["resources"] == {"limits": {"cpu": "4"}}  # no accelerator for tokenising
    # The ConfigMap: the raw config for the stage, the prepared one for the workers.
    data = render_configmap(REF, s)["data"]
    assert json.loads(data["stage.json"])["data"]["train"] == "corpus://shakespeare"
    worker = json.loads(data["config.json"])
    assert worker["data"]["train"] == location + "train/" and worker["data"]["validation"] == location + "validation/"
    assert worker["tokenizer"] == {"path": location + "tokenizer/"} and "validationSplit" not in worker["data"]
    assert "initContainers" not in render_pod(REF, s, 0)["spec"]


def test_parts_fan_out_as_an_indexed_job_between_the_tokenizer_and_the_merge() -> None:
    s = spec(preparation={"uri": "s3://bucket/prepared/", "parts": 4})
    jobs = render_stage_jobs(REF, s)
    assert [j["metadata"]["name"] for j in jobs] == ["tiny-tokenizer", "tiny-prepare", "tiny-merge"]
    assert [j["spec"]["completions"] for j in jobs] == [1, 4, 1] and jobs[1]["spec"]["parallelism"] == 4
    commands = [j["spec"]["template"]["spec"]["containers"][0]["command"] for j in jobs]
    assert [c[c.index("--step") + 1] for c in commands] == ["tokenizer", "part", "merge"]
    assert commands[1][commands[1].index("--parts") + 1] == "4" and "--part" not in commands[1]
    assert preparation.location(s, "/out", ).startswith("s3://bucket/prepared/")


def test_one_worker_without_shared_storage_prepares_in_an_init_container_into_its_own_output() -> None:
    s = spec(checkpoint={"uri": None}, workers={"nodes": 1, "podTemplate": {
        "initContainers": [{"name": "theirs", "image": "busybox"}]}})
    assert preparation.mode(s) == "init" and render_stage_jobs(REF, s) == []
    checked = validate_job("tiny", s.to_wire())
    assert checked.error is None and any("again after every restart" in w for w in checked.warnings)
    pod = render_pod(REF, s, 0)["spec"]
    init = pod["initContainers"]
    assert [c["name"] for c in init] == ["prepare", "theirs"]
    location = init[0]["command"][init[0]["command"].index("--to") + 1]
    assert location.startswith("/var/run/kubetrain/output/prepared/")
    assert {"name": "kubetrain-output", "mountPath": "/var/run/kubetrain/output"} in init[0]["volumeMounts"]
    worker = json.loads(render_configmap(REF, s)["data"]["config.json"])
    assert worker["data"]["train"] == location + "train/"


@pytest.mark.parametrize("workers", [{"nodes": 2}, {"nodes": 1, "maxNodes": 3}])
def test_several_workers_without_shared_storage_are_refused_naming_checkpoint_uri(workers: dict[str, Any]) -> None:
    s = spec(checkpoint={"uri": None}, workers=workers)
    checked = validate_job("tiny", s.to_wire())
    assert checked.spec is None and checked.error is not None
    assert checked.error.startswith("spec.checkpoint.uri: spec.tokenizer.train learns a tokenizer")
    assert "s3:// prefix or a path on a volume every worker mounts" in checked.error
    raw_only = spec(checkpoint={"uri": None}, workers=workers, tokenizer={"path": "/tok", "train": None},
                    data={"train": "/data/*.txt", "validation": None})
    assert "spec.data.train ('/data/*.txt') is raw text" in (validate_job("tiny", raw_only.to_wire()).error or "")


def test_a_name_too_long_for_the_stage_jobs_and_parts_without_shared_storage_are_refused() -> None:
    name = "n" * 54
    assert "too long for the data preparation Jobs" in (
        validate_job(name, spec(checkpoint={"uri": "s3://b/c/"}).to_wire()).error or "")
    assert validate_job(name, JobSpec.model_validate(spec_dict()).to_wire()).error is None
    error = validate_job("tiny", spec(checkpoint={"uri": None}, workers={"nodes": 1},
                                      preparation={"parts": 3}).to_wire()).error
    assert error is not None and error.startswith("spec.preparation.parts (3)")
    with pytest.raises(ValueError, match=r"preparation\.uri scheme gs://"):
        spec(preparation={"uri": "gs://b/x"})


def test_stage_jobs_and_pods_are_observed_from_any_body() -> None:
    body = {"metadata": {"name": "tiny-prepare", "uid": "j1", "labels": {"kubetrain.io/prepare-step": "part"}},
            "status": {"succeeded": 2, "active": 1,
                       "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                       "message": "Job has reached the specified backoff limit"}]}}
    job = preparation.observe_stage_job(body)
    assert job == preparation.StageJob("tiny-prepare", "j1", "part", failed=True, succeeded=2, active=1,
                                       message="Job has reached the specified backoff limit")
    assert preparation.observe_stage_job({"metadata": {"name": "x"}}) is None
    assert preparation.observe_stage_job("nonsense") is None
    pod = {"metadata": {"name": "tiny-prepare-0-abcde", "creationTimestamp": "2026-01-01T00:00:00Z",
                        "labels": {"kubetrain.io/role": "prepare", "kubetrain.io/prepare-step": "all"}},
           "status": {"phase": "Failed", "containerStatuses": [
               {"name": "prepare", "state": {"terminated": {"exitCode": 2, "message": "error: data.train: no"}}}]}}
    assert preparation.observe_stage_pod(pod) == preparation.StagePod(
        "tiny-prepare-0-abcde", "all", "Failed", 2, "error: data.train: no", created="2026-01-01T00:00:00Z")
    worker = {"metadata": {"name": "tiny-worker-0", "labels": {"kubetrain.io/role": "worker"}},
              "status": {"phase": "Pending", "initContainerStatuses": [
                  {"name": "prepare", "state": {"running": {"startedAt": "x"}}}]}}
    assert preparation.observe_stage_pod(worker) == preparation.StagePod("tiny-worker-0", "all", "Running", init=True)
    assert preparation.observe_stage_pod({"metadata": {"name": "tiny-worker-1"}, "status": {}}) is None
    assert preparation.observe_stage_pod(None) is None
