"""crd.py: the LLMTrainingJob CRD generated from the models (status and scale subresources, printer columns,
a description on every field), its schema as the API server applies it to the examples and to wrong types,
and manifests/crd.yaml and the chart's copy regenerated from it (drift)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubetrain_operator.crd import build_crd, crd_yaml
from support import ROOT


def _walk(schema: dict[str, Any], path: str = "") -> list[str]:
    missing = [] if schema.get("description") or path in ("", ".metadata") else [path]
    for name, sub in (schema.get("properties") or {}).items():
        missing += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict) and schema["items"].get("properties"):
        missing += _walk(schema["items"], f"{path}[]")
    return missing


def test_crd_has_status_scale_columns_and_a_description_on_every_field() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["ltj", "llmjob"] and crd["spec"]["scope"] == "Namespaced"
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.workers.nodes",
                                               "statusReplicasPath": ".status.workers.active",
                                               "labelSelectorPath": ".status.selector"}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Nodes", "Step", "Loss", "Tokens/s", "Restarts", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    spec_props = schema["properties"]["spec"]["properties"]
    assert spec_props["model"]["properties"]["preset"]["enum"][0] == "tiny"
    assert spec_props["training"]["properties"]["maxSteps"] == {
        "description": "Optimizer steps to train. Default: 1000.", "type": "integer", "minimum": 0,
        "exclusiveMinimum": True}
    assert spec_props["model"]["properties"]["config"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec_props["training"]["properties"]["optimizer"]["properties"]["betas"]["items"] == {"type": "number"}
    assert spec_props["workers"]["x-kubernetes-validations"]
    assert "additionalProperties" not in json.dumps(spec_props["training"])  # structural: no false/true flags


def _api_server_validator() -> Any:
    """The CRD's openAPIV3Schema as a JSON Schema validator. OpenAPI 3.0 schemas are JSON Schema draft 4
    (boolean exclusiveMinimum) plus x-kubernetes-* extensions, which draft 4 ignores; `kubectl apply`
    (strict field validation since 1.27) also rejects unknown fields, which additionalProperties: false
    on every object without x-kubernetes-preserve-unknown-fields expresses. CEL rules are not evaluated here
    (the operator checks the same constraints itself: tests/operator/test_validate.py's InvalidSpec tests)."""
    import jsonschema

    def strict(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if node.get("type") == "object" and "properties" in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        elif isinstance(node, list):
            node = [strict(v) for v in node]
        return node

    schema = strict(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server validates metadata itself
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "manifests/examples").glob("*.yaml")))
def test_examples_pass_the_crd_schema(example: str) -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/examples" / example).read_text())
            if d and d.get("kind") == "LLMTrainingJob"]
    assert docs
    for doc in docs:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in
                  _api_server_validator().iter_errors(doc)]
        assert errors == []


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("spec", "training", "maxSteps"), "ten", "is not of type 'integer'"),
    (("spec", "training", "maxSteps"), 0, "less than or equal to the minimum"),
    (("spec", "workers", "nodes"), 1.5, "is not of type 'integer'"),
    (("spec", "training", "optimizer", "lr"), "fast", "is not of type 'number'"),
    (("spec", "runPolicy", "cleanPodPolicy"), "Sometimes", "is not one of"),
    (("spec", "training", "maxStep"), 10, "Additional properties are not allowed"),
])
def test_the_crd_schema_rejects_wrong_types_at_apply(path: tuple[str, ...], value: Any, complaint: str) -> None:
    doc = yaml.safe_load((ROOT / "manifests/examples/tiny-cpu.yaml").read_text())
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    errors = [(".".join(map(str, e.absolute_path)), e.message) for e in _api_server_validator().iter_errors(doc)]
    where = ".".join(path) if "Additional" not in complaint else ".".join(path[:-1])
    assert any(at == where and complaint in message for at, message in errors), errors


@pytest.mark.parametrize("path", ["manifests/crd.yaml", "charts/kubetrain/crds/llmtrainingjobs.yaml"])
def test_crd_files_are_generated_from_the_models(path: str) -> None:
    """Regenerate with: kubetrain crd --write manifests/crd.yaml --write charts/kubetrain/crds/llmtrainingjobs.yaml"""
    assert (ROOT / path).read_text() == crd_yaml(), f"{path} is stale: regenerate it with `kubetrain crd --write`"
    assert yaml.safe_load((ROOT / path).read_text())["kind"] == "CustomResourceDefinition"
