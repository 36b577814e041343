"""`kubetrain render` (the objects the operator would create for a manifest, with its warnings and
errors) and `kubetrain crd` (the CRD), run as the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from kubetrain_operator.crd import crd_yaml
from support import ROOT


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetrain_cli", *args], capture_output=True, text=True, timeout=120)


def test_kubetrain_render_prints_what_the_operator_creates(tmp_path: Path) -> None:
    result = _cli("render", str(ROOT / "manifests/examples/llama-7b.yaml"), "--namespace", "ml")
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["Service", "ConfigMap", "Pod", "Pod", "Pod", "Pod"]
    assert "the batch does not split" not in result.stderr  # the example keeps training on minNodes
    manifest = yaml.safe_load((ROOT / "manifests/examples/llama-7b.yaml").read_text())
    manifest["spec"]["training"]["globalBatchSize"] = 1024  # 1024 / 24 processes does not divide
    uneven = tmp_path / "uneven.yaml"
    uneven.write_text(yaml.safe_dump(manifest))
    result = _cli("render", str(uneven))
    assert result.returncode == 0 and "with 3 nodes (24 processes) the batch does not split" in result.stderr
    bad = tmp_path / "bad.yaml"
    manifest = yaml.safe_load((ROOT / "manifests/examples/llama-7b.yaml").read_text())
    manifest["spec"]["workers"]["podTemplate"]["hostPID"] = True
    bad.write_text(yaml.safe_dump(manifest))
    result = _cli("render", str(bad))
    assert result.returncode == 2 and "spec.workers.podTemplate.hostPID: not supported" in result.stderr


def test_kubetrain_crd_prints_the_crd() -> None:
    result = _cli("crd")
    assert result.returncode == 0 and result.stdout == crd_yaml()
