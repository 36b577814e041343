"""The images' installs, without a Docker engine: each Dockerfile's own pip commands run in a clean venv
(no system site packages) over exactly the files the Dockerfile copies, and each side must install without
the other side's dependencies: no torch in the operator, no Kopf in the trainer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

OPERATOR_INSTALL = ["pip install -c constraints.txt '.[operator]'"]
TRAINER_INSTALL = ["pip install torch==2.13.0", "pip install -c constraints.txt '.[trainer]'"]

pytestmark = pytest.mark.slow


def dockerfile(path: Path) -> tuple[str, list[str]]:
    """(the RUN commands joined, the build-context paths its COPY lines take)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    runs = " && ".join(line[4:] for line in text.splitlines() if line.startswith("RUN "))
    copied = [src for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line
              for src in line.split()[1:-1]]
    return runs, copied


def install(tmp_path: Path, path: Path, commands: list[str]) -> Path:
    runs, copied = dockerfile(path)
    for command in commands:
        assert command in runs, f"{path}: does not run `{command}`"
    context = tmp_path / "context"
    for src in copied:
        target = context / src
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=context, capture_output=True, text=True, timeout=600,
                                env=clean_env(venv))
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return venv


def clean_env(venv: Path) -> dict[str, str]:
    """Only the new venv on PATH, nothing of the test's own environment's Python; pip keeps its cache (HOME),
    filled by `make install` with the same pinned wheels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))}
    return {**env, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def imports(venv: Path, module: str) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True).returncode == 0


def test_torch_pin_matches_the_makefile() -> None:
    assert "TORCH ?= torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_operator_image_installs_without_torch(tmp_path: Path) -> None:
    venv = install(tmp_path, ROOT / "operator" / "Dockerfile", OPERATOR_INSTALL)
    try:
        assert not imports(venv, "torch") and not imports(venv, "transformers")
        assert not imports(venv, "kubetrain_trainer")  # the Dockerfile copies only api/, operator/ and cli/
        assert imports(venv, "kubetrain_operator.handlers")  # Kopf and the whole operator
        result = subprocess.run([str(venv / "bin" / "kubetrain"), "operator", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--leader-elect" in result.stdout
        text = (ROOT / "operator" / "Dockerfile").read_text()
        assert "FROM python:3.11-slim" in text and "USER 10001" in text
    finally:
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def test_trainer_image_installs_without_kopf(tmp_path: Path) -> None:
    venv = install(tmp_path, ROOT / "trainer" / "Dockerfile", TRAINER_INSTALL)
    try:
        assert not imports(venv, "kopf") and not imports(venv, "kubernetes_asyncio")
        assert not imports(venv, "kubetrain_operator")  # the Dockerfile copies only api/, trainer/ and cli/
        assert imports(venv, "kubetrain_trainer.train") and imports(venv, "kubetrain_trainer.entrypoint")
        assert (venv / "bin" / "torchrun").exists()
        result = subprocess.run([str(venv / "bin" / "kubetrain"), "run", "--help"], capture_output=True, text=True)
        assert result.returncode == 0
        text = (ROOT / "trainer" / "Dockerfile").read_text()
        assert 'ENTRYPOINT ["torchrun"]' in text and "USER 10001" in text
        # torch.compile (training.compile, on by default for long runs) compiles with g++/gcc at run time.
        assert re.search(r"^RUN apt-get .*install .*\bg\+\+", text, re.MULTILINE), "the image needs g++"
    finally:
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)
