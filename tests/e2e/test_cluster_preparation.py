"""Data preparation on the test bed: raw text prepared on the cluster before the workers train, by the same code as
`kubetrain run` (python -m kubetrain_trainer.prepare_stage), with the real operator, the real Job controller and
torchrun in pods on the local nodes.

- manifests/examples/tiny-cpu.yaml as shipped (one worker, no shared storage: the worker's init container
  prepares corpus://shakespeare, trains its own tokenizer) with fewer steps and a smaller evaluation; the bed adds
  only the corpus the image bakes (pods have no network): a read-only hostPath at KUBETRAIN_CORPORA.
- raw .txt files under an s3:// prefix, two workers, checkpoints on S3: a stage Job prepares them under the
  job's S3 location (phase Preparing) and the workers train; the job deleted and applied again reuses the output.
- the stage fanned out (`preparation.parts: 2`: tokenizer, an Indexed Job of two parts, merge) beside a job whose
  prefix holds no text (its stage pod exits 2: PreparationFailed at once, with the stage's message).

Fixtures: tests/e2e/conftest.py; the helpers: tests/support/bed.py."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.client import Kube, kubectl
from kubetrain_api.preparation import MARKER
from kubetrain_trainer.preparation import CORPORA
from support import ROOT, deep_merge, wait_for
from support.bed import BUCKET, apply, diagnose, ended_recording, manifest, secret, status, wait_or_explain, workers
from support.s3 import MotoServer, objects

pytestmark = pytest.mark.slow

BAKED = "/opt/kubetrain/corpora"  # trainer/Dockerfile's KUBETRAIN_CORPORA


@pytest.fixture(scope="module")
def corpora(corpus_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A world-readable copy of the corpus cache laid out as the image bakes it (<package>/<its glob>)."""
    root = tmp_path_factory.mktemp("corpora")
    spec = CORPORA["shakespeare"]
    depth = len(Path(spec["glob"]).parts) + 1  # <corpora>/<package dir>/<glob>
    for f in corpus_files:
        target = root / f.relative_to(f.parents[depth - 1])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert len(glob.glob(str(root / spec["package"].replace("==", "-") / spec["glob"]))) == len(corpus_files)
    return root


def pod_logs(local_cluster: Any, ns: str, pod: str, container: str | None = None) -> str:
    return "".join(node.logs(ns, pod, container) for node in local_cluster.nodes)


def stage_pods(kube: Kube, ns: str, name: str) -> list[str]:
    return [p["metadata"]["name"] for p in kube.list(f"/api/v1/namespaces/{ns}/pods",
                                                     labelSelector=f"kubetrain.io/job-name={name},"
                                                                   "kubetrain.io/role=prepare")]


def test_tiny_cpu_as_shipped_prepares_in_its_init_container_and_succeeds(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, operator: Any, corpora: Path,
        tmp_path: Path) -> None:
    ns, name = namespace, "tiny-cpu"
    body = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    body["metadata"]["namespace"] = ns
    deep_merge(body["spec"], {
        "training": {"maxSteps": 4, "schedule": {"warmupSteps": 2}, "evalEvery": 2, "evalBatches": 1},
        "workers": {"podTemplate": {
            "volumes": [{"name": "corpora", "hostPath": {"path": str(corpora), "type": "Directory"}}],
            "volumeMounts": [{"name": "corpora", "mountPath": BAKED, "readOnly": True}]}},
    })
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, name, tmp_path / "operator.log")  # noqa: E731
    phases: list[str] = []
    wait_or_explain(ended_recording(kube, ns, name, phases), why, 480, "tiny-cpu to end")
    st = status(kube, ns, name)
    assert st["phase"] == "Succeeded", why()
    assert st["progress"]["step"] == 4 and st.get("restarts", 0) == 0, st
    assert "Preparing" in phases, phases  # the init container's time shows as Preparing
    (pod,) = workers(kube, ns, name)  # the one worker, kept once succeeded (cleanPodPolicy Running)
    init = pod["status"]["initContainerStatuses"][0]
    assert (init["name"], init["state"]["terminated"]["exitCode"]) == ("prepare", 0), init
    log = pod_logs(local_cluster, ns, pod["metadata"]["name"], "prepare")
    assert "all: prepared" in log, log[-2000:]


def test_raw_text_on_s3_is_prepared_once_by_a_stage_job_and_reused_when_the_job_is_applied_again(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        small_corpus: Path, tmp_path: Path) -> None:
    ns, name = namespace, "raw"
    client = bed_s3.client()
    for f in sorted(small_corpus.glob("*.txt")):
        client.upload_file(str(f), BUCKET, f"{ns}/raw-text/{f.name}")
    body = manifest(ns, name, bed_s3, secret(kube, ns),
                    tokenizer={"path": None, "train": {"vocabSize": 512}},
                    data={"train": f"s3://{BUCKET}/{ns}/raw-text/", "validation": None, "validationSplit": 0.2},
                    training={"maxSteps": 6, "evalEvery": 3},
                    checkpoint={"everySteps": 3, "exportHF": False})
    apply(control_plane, body, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, name, tmp_path / "operator.log")  # noqa: E731
    phases: list[str] = []
    wait_or_explain(ended_recording(kube, ns, name, phases), why, 480, "the job to end")
    st = status(kube, ns, name)
    assert st["phase"] == "Succeeded", why()
    assert phases[0] == "Preparing" and "Running" in phases, phases
    stage = stage_pods(kube, ns, name)
    assert stage and all(p.startswith(f"{name}-prepare-0-") for p in stage), stage
    first_log = pod_logs(local_cluster, ns, stage[0])
    assert "all: prepared" in first_log, first_log[-2000:]
    stored = objects(client, BUCKET, f"{ns}/{name}/prepared/")
    (marker,) = [k for k in stored if k.endswith("/" + MARKER)]
    before = client.head_object(Bucket=BUCKET, Key=marker)
    assert any("/train/" in k for k in stored) and any("/tokenizer/" in k for k in stored), sorted(stored)

    # Deleted and applied again: a new stage Job finds the marker for these inputs and exits at once.
    kubectl(control_plane.kubeconfig, "delete", "ltj", name, "-n", ns, "--wait=true", "--timeout=120s")
    wait_for(lambda: not stage_pods(kube, ns, name) and not workers(kube, ns, name), timeout=120,
             what="the first job's pods gone")
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [  # its checkpoints: the second run trains again
        {"Key": k} for k in objects(client, BUCKET, f"{ns}/{name}/") if "/prepared/" not in k]})
    apply(control_plane, body, tmp_path)
    phases.clear()
    wait_or_explain(ended_recording(kube, ns, name, phases), why, 480, "the job applied again to end")
    assert status(kube, ns, name)["phase"] == "Succeeded", why()
    (again,) = stage_pods(kube, ns, name)
    log = pod_logs(local_cluster, ns, again)
    assert "reusing them" in log and "all: reused" in log, log[-2000:]
    after = client.head_object(Bucket=BUCKET, Key=marker)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
    assert objects(client, BUCKET, f"{ns}/{name}/prepared/") == stored  # nothing tokenised again


def test_a_fanned_out_stage_merges_one_index_and_a_stage_with_no_input_fails_the_job_at_once(
        local_cluster: Any, kube: Kube, control_plane: Any, namespace: str, bed_s3: MotoServer, operator: Any,
        small_corpus: Path, tmp_path: Path) -> None:
    """Two jobs side by side: `preparation.parts: 2` runs the tokenizer Job, an Indexed Job of two parts and the
    merge Job, then trains on the one index; a prefix with no text fails at its stage pod's exit 2, with the
    stage's message, and no worker ever starts."""
    ns, client = namespace, bed_s3.client()
    for f in sorted(small_corpus.glob("*.txt")):
        client.upload_file(str(f), BUCKET, f"{ns}/raw-text/{f.name}")
    common = {"tokenizer": {"path": None, "train": {"vocabSize": 512}},
              "training": {"maxSteps": 3, "evalEvery": 3}, "checkpoint": {"everySteps": 3, "exportHF": False}}
    credentials = secret(kube, ns)
    fan = manifest(ns, "fan", bed_s3, credentials, preparation={"parts": 2},
                   data={"train": f"s3://{BUCKET}/{ns}/raw-text/", "validation": None, "validationSplit": 0.2},
                   **common)
    empty = manifest(ns, "empty", bed_s3, credentials,
                     data={"train": f"s3://{BUCKET}/{ns}/nothing-here/", "validation": None}, **common)
    apply(control_plane, fan, tmp_path)
    apply(control_plane, empty, tmp_path)
    why = lambda: diagnose(local_cluster, kube, ns, "fan", tmp_path / "operator.log")  # noqa: E731
    wait_or_explain(ended_recording(kube, ns, "empty", []), why, 240, "the job with no input to end")
    st = status(kube, ns, "empty")
    assert (st["phase"], st["reason"]) == ("Failed", "PreparationFailed"), st
    assert "data.train: no .txt/.jsonl/.parquet objects match" in st["message"], st["message"]
    assert "(exit 2)" in st["message"], st["message"]
    assert not workers(kube, ns, "empty") or all(
        p["metadata"]["labels"].get("kubetrain.io/role") == "prepare" for p in workers(kube, ns, "empty"))
    phases: list[str] = []
    wait_or_explain(ended_recording(kube, ns, "fan", phases), why, 480, "the fanned-out job to end")
    assert status(kube, ns, "fan")["phase"] == "Succeeded", why()
    assert phases[0] == "Preparing" and "Running" in phases, phases
    stage = sorted(stage_pods(kube, ns, "fan"))
    assert [p.rsplit("-", 1)[0] for p in stage] == ["fan-merge-0", "fan-prepare-0", "fan-prepare-1",
                                                    "fan-tokenizer-0"], stage
    stored = objects(client, BUCKET, f"{ns}/fan/prepared/")
    assert sum(k.endswith("/" + MARKER) for k in stored) == 1 and any("/train/" in k for k in stored), sorted(stored)
