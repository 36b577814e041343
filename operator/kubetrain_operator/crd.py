"""The LLMTrainingJob CustomResourceDefinition, generated from the pydantic models (`kubetrain crd`).

pydantic's JSON Schema becomes a Kubernetes structural schema: references inlined, optional fields
un-wrapped, exclusive bounds in OpenAPI v3 form, free-form maps marked to preserve their fields,
defaults stated in the descriptions (the operator applies them, so the models stay the one source).
"""

from __future__ import annotations

from typing import Any

import yaml
from kubetrain_api.manifest import GROUP, KIND, PLURAL, SHORT_NAMES, VERSION, JobSpec
from kubetrain_api.status import JobStatus

# Descriptions for the trainer's sections, whose models (owned by the trainer) carry none on the field.
SECTION_DESCRIPTIONS = {
    "spec": "What to train and how to run it: the trainer sections plus the cluster sections "
            "(image, workers, runPolicy).",
    "spec.model": "The model architecture: a preset, LlamaConfig overrides, or weights to start from.",
    "spec.tokenizer": "The tokenizer: a path to load, or train a byte-level BPE on the training data.",
    "spec.tokenizer.train": "Train a byte-level BPE on the training data instead of loading one.",
    "spec.data": "Training and validation text, and how it is cut into sequences.",
    "spec.training": "The optimisation: steps, batch sizes, optimizer, schedule, precision, parallelism.",
    "spec.training.optimizer": "AdamW hyper-parameters.",
    "spec.training.schedule": "Learning-rate schedule: linear warmup, then decay.",
    "spec.checkpoint": "Where and how often checkpoints are committed, and the final export.",
    "spec.metrics": "The Prometheus /metrics and /progress endpoint of every worker.",
    "spec.s3": "S3-compatible storage for s3:// URIs; credentials come from a Secret.",
    "spec.workers": "Worker pods: how many (elastic range), processes per pod, resources and pod overrides.",
    "spec.runPolicy": "Restarts, backoff, deadline, clean-up, suspension and stall detection.",
    "status": "The observed state, written by the operator.",
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".status.workers.active"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# Cross-field rules the API server checks at `kubectl apply` and `kubectl scale` (CEL, Kubernetes >= 1.25).
# Absent fields take the operator's defaults (nodes: 1, minNodes/maxNodes: nodes).
_NODES = "(has(self.nodes) ? self.nodes : 1)"
WORKERS_RULES = [
    {"rule": f"(has(self.minNodes) ? self.minNodes : {_NODES}) <= {_NODES}",
     "message": "workers.nodes must not be below workers.minNodes"},
    {"rule": f"{_NODES} <= (has(self.maxNodes) ? self.maxNodes : {_NODES})",
     "message": "workers.nodes must not exceed workers.maxNodes (kubectl scale stays within minNodes..maxNodes)"},
]


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _default_text(value: Any) -> str | None:
    if value is None or value == {} or value == []:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def to_structural(node: dict[str, Any], path: str = "") -> dict[str, Any]:
    """One JSON Schema node (references already inlined) to a Kubernetes structural schema node."""
    node = dict(node)
    if "anyOf" in node:  # Optional[X] (pydantic: anyOf [X, null]); the API server prunes nulls
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"{path}: unions are not supported in the CRD schema")
        node = {**options[0], **node}
    out: dict[str, Any] = {}
    description = node.get("description") or SECTION_DESCRIPTIONS.get(path)
    default = _default_text(node.get("default"))
    if description and default is not None and "Default" not in description:
        description = f"{description.rstrip('.')}. Default: {default}."
    if description:
        out["description"] = description
    if "const" in node:
        node.setdefault("enum", [node["const"]])
    kind = node.get("type")
    if kind is None and "enum" in node:
        kind = "string"
    if kind is None:
        raise ValueError(f"{path}: no type in the schema")
    out["type"] = kind
    if "enum" in node:
        out["enum"] = list(node["enum"])
    for key in ("minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "format"):
        if key in node:
            out[key] = node[key]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[flag] = node[bound]
            out[bound] = True
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {name: to_structural(sub, f"{path}.{name}" if path else name)
                                 for name, sub in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = to_structural(extra, f"{path}.*")
        else:  # a free-form map (LlamaConfig overrides, resources, podTemplate)
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        items = node.get("items")
        if items is None and "prefixItems" in node:  # tuple[float, float]
            kinds = {json_type(p) for p in node["prefixItems"]}
            if len(kinds) != 1:
                raise ValueError(f"{path}: mixed tuples are not supported in the CRD schema")
            items = node["prefixItems"][0]
        if items is None:
            raise ValueError(f"{path}: an array needs an item type")
        out["items"] = to_structural(items, f"{path}[]")
    return out


def json_type(node: dict[str, Any]) -> str:
    return str(node.get("type"))


def spec_schema() -> dict[str, Any]:
    raw = JobSpec.model_json_schema(by_alias=True, mode="validation")
    schema = to_structural(_inline(raw, raw.get("$defs", {})), "spec")
    schema["properties"]["workers"]["x-kubernetes-validations"] = WORKERS_RULES
    return schema


def status_schema() -> dict[str, Any]:
    raw = JobStatus.model_json_schema(by_alias=True, mode="serialization")
    return to_structural(_inline(raw, raw.get("$defs", {})), "status")


def build_crd() -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": "An LLMTrainingJob trains a Llama-style language model on worker pods (torchrun, "
                       "elastic) from one manifest; `kubetrain run` runs the same manifest locally.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetrain.io/v1alpha1"},
            "kind": {"type": "string", "description": "LLMTrainingJob"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "kubetrain"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": list(SHORT_NAMES), "categories": ["all", "kubetrain"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.workers.nodes",
                              "statusReplicasPath": ".status.workers.active",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


HEADER = "# Generated by `kubetrain crd` from operator/kubetrain_operator/{spec,status}.py; do not edit.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
