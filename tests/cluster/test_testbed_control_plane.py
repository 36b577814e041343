"""Without the control plane's assets the test bed's tests skip, except with CI=true (tests/conftest.py,
tests/cluster/controlplane.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

# Any test of the bed that needs the control plane: without it, skipped (or, with CI=true, an error).
NEEDS_CONTROL_PLANE = ("tests/cluster/test_node_volumes_env.py"
                       "::test_missing_configmap_and_secret_keys_wait_with_a_reason")


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_control_plane_skips_outside_ci_and_fails_the_run_in_ci(ci: str, tmp_path: Path) -> None:
    env = {**os.environ, "KUBETRAIN_K8S_ASSETS": str(tmp_path / "nowhere"), "CI": ci}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             NEEDS_CONTROL_PLANE],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "nowhere/up.sh is missing" in result.stdout, result.stdout
    if ci:
        assert result.returncode != 0 and "CI=true needs the control plane" in result.stdout
    else:
        assert result.returncode == 0 and "1 skipped" in result.stdout
