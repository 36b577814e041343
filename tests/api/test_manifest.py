"""kubetrain_api.manifest and kubetrain_api.config: the manifest and the trainer config, their defaults and
camelCase, and bad input rejected with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetrain_api.config import TrainerConfig, TrainingSpec
from kubetrain_api.manifest import JobSpec, ManifestError, load_manifest, parse_manifest
from support import ROOT, job_manifest, training_spec


def test_example_manifests_validate() -> None:
    tiny = load_manifest(ROOT / "manifests/examples/tiny-cpu.yaml")
    assert tiny.metadata.name == "tiny-cpu"
    assert tiny.spec.workers.proc_per_node == 2
    assert tiny.spec.data.train == "corpus://shakespeare"
    assert tiny.spec.checkpoint.export_hf is True
    big = load_manifest(ROOT / "manifests/examples/llama-7b.yaml")
    assert big.spec.model.preset == "llama-7b"
    assert (big.spec.workers.nodes, big.spec.workers.proc_per_node) == (4, 8)
    assert big.spec.training.batch_layout_error(32) is None
    assert big.spec.training.batch_layout_error(24) is None  # minNodes 3 × 8 GPUs can keep training


def test_camel_case_round_trip_and_trainer_section() -> None:
    spec = JobSpec.model_validate({"data": {"train": "x", "seqLength": 128}, "tokenizer": {"train": {"vocabSize": 300}},
                                   "training": {"globalBatchSize": 8, "microBatchSize": 2, "maxSteps": 5},
                                   "workers": {"nodes": 2, "minNodes": 1, "maxNodes": 3, "procPerNode": 4}})
    wire = spec.to_wire()
    assert wire["data"]["seqLength"] == 128 and wire["workers"]["procPerNode"] == 4
    assert wire["checkpoint"]["exportHF"] is True
    assert JobSpec.model_validate(wire) == spec
    trainer = spec.trainer_config()
    assert isinstance(trainer, TrainerConfig) and not hasattr(trainer, "workers")
    assert trainer.training.global_batch_size == 8


def _error(manifest: dict) -> str:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(manifest)
    return str(exc.value)


@pytest.mark.parametrize(("change", "expected"), [
    ({"model": {"preset": "llama-70b"}}, "spec.model.preset: Input should be 'tiny', 'llama-125m'"),
    ({"data": {"seqLength": 0}}, "spec.data.seqLength: Input should be greater than or equal to 8"),
    ({"training": {"maxSteps": -1}}, "spec.training.maxSteps: Input should be greater than 0"),
    ({"training": {"globalBatchSize": 8, "microBatchSize": 3}},
     "spec.training.microBatchSize (3) must divide training.globalBatchSize (8); pick a divisor such as 2"),
    ({"workers": {"nodes": 2, "minNodes": 3, "maxNodes": 2}}, "spec.workers.minNodes (3) must not exceed"),
    ({"training": {"learningRate": 1}}, "spec.training.learningRate: unknown field"),
    ({"tokenizer": {"path": "x", "train": {"vocabSize": 500}}}, "set either tokenizer.path or tokenizer.train"),
    ({"data": {"validation": "v", "validationSplit": 0.1}}, "set either data.validation or data.validationSplit"),
    ({"checkpoint": {"uri": "gs://bucket/x"}}, "checkpoint.uri scheme gs:// is not supported"),
    ({"checkpoint": {"uri": "s3://"}}, "checkpoint.uri: s3:// needs a bucket"),
    ({"s3": {"partSizeBytes": 6291456, "objectSizeBytes": 10485760}},
     "s3.objectSizeBytes (10485760) must be a multiple"),
    ({"training": {"schedule": {"warmupSteps": 50}, "maxSteps": 10}}, "warmupSteps (50) must be below"),
    ({"training": {"optimizer": {"betas": [0.9, 1.5]}}}, "betas must both lie in [0, 1)"),
])
def test_bad_fields_are_named_with_the_fix(tmp_path: Path, change: dict, expected: str) -> None:
    manifest = job_manifest(spec=training_spec(tmp_path), **change)
    assert expected in _error(manifest)


def test_missing_data_and_wrong_kind_are_named(tmp_path: Path) -> None:
    manifest = job_manifest(spec=training_spec(tmp_path))
    del manifest["spec"]["data"]
    assert "spec.data: required field is missing" in _error(manifest)
    wrong_kind = {**job_manifest(spec=training_spec(tmp_path)), "kind": "PyTorchJob"}
    assert "kind: Input should be 'LLMTrainingJob'" in _error(wrong_kind)
    no_tokenizer = job_manifest(spec=training_spec(tmp_path))
    no_tokenizer["spec"]["tokenizer"] = {}
    assert "tokenizer: set tokenizer.path" in _error(no_tokenizer)


def test_per_process_batch_layout() -> None:
    t = TrainingSpec(global_batch_size=8, micro_batch_size=4)
    assert t.batch_layout_error(2) is None
    assert "must divide the per-process batch (8 / 4 processes = 2); use 2" in (t.batch_layout_error(4) or "")
    assert "multiple of the number of processes (3)" in (t.batch_layout_error(3) or "")


def test_manifest_file_may_hold_other_documents(tmp_path: Path) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all([secret, job_manifest(spec=training_spec(tmp_path), name="second")]))
    assert load_manifest(path).metadata.name == "second"


@pytest.mark.parametrize(("section", "field", "value"), [
    ("workers", "maxNodes", 10**7), ("workers", "nodes", 10_001), ("workers", "minNodes", 10_001),
    ("runPolicy", "restartBackoffSeconds", 2**62), ("runPolicy", "activeDeadlineSeconds", 2**62),
    ("runPolicy", "ttlSecondsAfterFinished", 2**62), ("runPolicy", "stallTimeoutSeconds", 2**62),
    ("runPolicy", "maxRestarts", 2**62), ("preparation", "uri", "s3://b/" + "x" * 2000),
])
def test_sizes_a_shared_operator_works_in_proportion_to_are_bounded(section: str, field: str, value: object) -> None:
    """A job is one of many the operator serves: what it may ask for is bounded, here and in the CRD schema
    generated from these models (kubetrain crd), so that the API server refuses more."""
    raw = {"data": {"train": "x"}, section: {field: value}}
    if field == "maxNodes":
        raw[section]["nodes"] = 1
    with pytest.raises(ManifestError, match=f"spec.{section}.{field}: "):
        parse_manifest({"apiVersion": "kubetrain.io/v1alpha1", "kind": "LLMTrainingJob",
                        "metadata": {"name": "x"}, "spec": raw})
