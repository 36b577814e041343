"""Helpers for the chart and monitoring tests: the real helm, kubectl, promtool and prometheus binaries that
scripts/install-tools.sh puts in .tools/bin (`make tools`), and rendering the chart."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from support import ROOT

CHART = ROOT / "charts" / "kubetrain"
TOOLS = ROOT / ".tools" / "bin"
RELEASE = NAMESPACE = "kubetrain"  # as `make manifests` renders it

# Every optional feature on, and the settings that change what is rendered.
ALL_ON = ["--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true",
          "--set", "prometheusRule.enabled=true", "--set", "grafanaDashboards.enabled=true"]


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} is missing: run `make tools` (scripts/install-tools.sh)"
    return str(path)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def template_text(*args: str) -> str:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args).stdout


def template(*args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template_text(*args)) if d]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[(o['kind'], o['metadata']['name']) for o in objs]}"
    return found[0]


def rules_file(path: Path, *args: str) -> Path:
    """The chart's PrometheusRule as a plain Prometheus rule file (what promtool and prometheus read)."""
    rule = one(template("--set", "prometheusRule.enabled=true", *args), "PrometheusRule")
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return path


def script(name: str) -> ModuleType:
    """A module of scripts/ (the generators of manifests/ and the dashboards), to compare with their output."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
