"""The import rules that keep the data flow one-way (docs/architecture.md):

- kubetrain_api imports the standard library, pydantic and PyYAML only: both images carry it;
- kubetrain_trainer never imports the operator (nor Kopf or the Kubernetes client);
- kubetrain_operator never imports the trainer (nor torch or transformers): its image has neither;
- kubetrain_cli imports each side lazily, inside the subcommand that needs it.

Checked twice: statically over every import statement of every module (a lazy import inside a function
counts too), and by importing the packages in a fresh interpreter and looking at sys.modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kubetrain_api": ROOT / "api" / "kubetrain_api",
            "kubetrain_trainer": ROOT / "trainer" / "kubetrain_trainer",
            "kubetrain_operator": ROOT / "operator" / "kubetrain_operator",
            "kubetrain_cli": ROOT / "cli" / "kubetrain_cli"}
OPERATOR_ONLY = {"kubetrain_operator", "kopf", "kubernetes_asyncio", "aiohttp"}
TRAINER_ONLY = {"kubetrain_trainer", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow",
                "boto3", "botocore", "matplotlib", "sentencepiece"}


def imported_modules(package_dir: Path) -> dict[str, set[str]]:
    """Top-level module name → the files (relative to the package) that import it. Relative imports stay
    inside the package and are left out."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(package_dir)))
    return found


def violations(package_dir: Path, forbidden: set[str]) -> list[str]:
    return [f"{file} imports {module}" for module, files in sorted(imported_modules(package_dir).items())
            if module in forbidden for file in sorted(files)]


def test_the_rule_finds_a_forbidden_import_even_inside_a_function(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text("from . import sibling\nimport json\n")
    (tmp_path / "bad.py").write_text("def f():\n    from kubetrain_operator.render import render_pod\n")
    assert violations(tmp_path, OPERATOR_ONLY) == ["bad.py imports kubetrain_operator"]
    assert violations(tmp_path, TRAINER_ONLY) == []


def test_the_api_package_imports_only_the_standard_library_pydantic_and_yaml() -> None:
    allowed = set(sys.stdlib_module_names) | {"pydantic", "yaml", "__future__"}
    extra = {m: f for m, f in imported_modules(PACKAGES["kubetrain_api"]).items() if m not in allowed}
    assert extra == {}


def test_the_trainer_does_not_import_the_operator() -> None:
    assert violations(PACKAGES["kubetrain_trainer"], OPERATOR_ONLY | {"kubetrain_cli"}) == []


def test_the_operator_does_not_import_the_trainer() -> None:
    assert violations(PACKAGES["kubetrain_operator"], TRAINER_ONLY | {"kubetrain_cli"}) == []


@pytest.mark.parametrize(("modules", "absent"), [
    ("kubetrain_api.manifest, kubetrain_api.status, kubetrain_api.contract, kubetrain_api.exit_codes",
     ("kubetrain_trainer", "kubetrain_operator", "torch", "kopf")),
    ("kubetrain_operator.handlers, kubetrain_operator.runner, kubetrain_operator.crd, kubetrain_cli.main",
     ("kubetrain_trainer", "torch", "transformers")),
    ("kubetrain_trainer.entrypoint", ("kubetrain_operator", "torch", "kopf")),
])
def test_importing_a_side_loads_nothing_of_the_other(modules: str, absent: tuple[str, ...]) -> None:
    code = (f"import sys, {modules}; "
            f"print(sorted(m for m in {absent!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kubetrain_run_reports_a_bad_manifest_before_torch_loads(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("apiVersion: kubetrain.io/v1alpha1\nkind: LLMTrainingJob\nmetadata: {name: x}\n"
                                       "spec: {data: {}}\n")
    code = ("import sys; from kubetrain_cli.main import main; code = main(['run', sys.argv[1]]); "
            "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.yaml")], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "spec.data.train" in result.stderr
