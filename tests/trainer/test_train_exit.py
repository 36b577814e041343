"""How the trainer process ends (`python -m kubetrain_trainer.train`): with main's exit code, its output
flushed, and without the interpreter's finalization, during which gloo's process groups sometimes aborted a
finished run (SIGABRT after the last commit; see train.exit_without_finalizing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kubetrain_api.contract import TRAINER_MODULE, trainer_argv
from kubetrain_api.exit_codes import EXIT_CONFIG

# An atexit handler stands for everything finalization would run (gloo's teardown included): it must not run.
LAUNCH = """
import atexit, runpy, sys
atexit.register(lambda: print("FINALIZED", flush=True))
sys.argv = [sys.argv[0], *sys.argv[1:]]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def run_trainer(config: Path, output: Path) -> subprocess.CompletedProcess[str]:
    argv = trainer_argv(str(config), str(output))[2:]  # after `-m kubetrain_trainer.train`
    return subprocess.run([sys.executable, "-c", LAUNCH.format(module=TRAINER_MODULE), *argv],
                          capture_output=True, text=True, timeout=120)


def test_the_trainer_exits_with_mains_code_and_skips_finalization(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": {"train": "/data/train"}, "tokenizer": {"path": "/data/tokenizer"},
                                  "training": {"maxSteps": 0}}))
    result = run_trainer(config, tmp_path / "out")
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "error: " in result.stderr and "training.maxSteps" in result.stderr
    assert "FINALIZED" not in result.stdout


def test_an_unexpected_exception_prints_its_traceback_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()  # reading it raises IsADirectoryError: no TrainerError handles that
    result = run_trainer(tmp_path / "config.json", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "IsADirectoryError" in result.stderr
    assert "FINALIZED" not in result.stdout
