"""The regression test of issue 12's torchrun reproduction: torchrun's second round inside the same agent
(`--max-restarts` ≥ 1 with a c10d endpoint) failed or hung in 3 of 7 runs here (gloo dialled the previous
round's ports). The workers now run torchrun as render.torchrun_args builds it: one round per pod
(`--max-restarts=0`), the operator relaunching fresh processes. Real torchrun agents, two "pods" as two agent
processes on this machine with one c10d endpoint, a script that forms a gloo group and all-reduces:

- an exit 2 ends both agents at once, the script run once each (torchrun never retries it);
- each relaunch, as the operator makes it (fresh agents, the same endpoint), forms the group again, every time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kubetrain_api.manifest import JobSpec
from kubetrain_operator.render import RDZV_PORT, JobRef, torchrun_args
from support import free_port, spec_dict, stop_process

SCRIPT = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size() == 2
with open(sys.argv[1], "a") as f:
    f.write(f"rank {dist.get_rank()} restart {os.environ['TORCHELASTIC_RESTART_COUNT']}\\n")
dist.destroy_process_group()
sys.exit(int(sys.argv[2]))
"""
ROUND_SECONDS = 240  # a generous bound: a round that hangs fails the test instead of the suite


def agent_command(port: int, script: Path, runs: Path, code: int) -> list[str]:
    """The worker's torchrun command as rendered for a 2-node job, its endpoint on this machine, the script
    in place of the trainer."""
    spec = JobSpec.model_validate(spec_dict(workers={"nodes": 2, "procPerNode": 1}, runPolicy={"maxRestarts": 3}))
    args = torchrun_args(JobRef("job", "ns", "uid-1"), spec)
    args = args[:args.index("-m")]
    args = [f"--rdzv-endpoint=127.0.0.1:{port}" if a.startswith("--rdzv-endpoint=") else a for a in args]
    return [sys.executable, "-m", "torch.distributed.run", *args[1:], str(script), str(runs), str(code)]


def round_of_two(port: int, script: Path, runs: Path, code: int, tmp_path: Path) -> list[int]:
    """Both agents' exit codes (each waited for at most ROUND_SECONDS)."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    agents = [subprocess.Popen(agent_command(port, script, runs, code), env=env, stdout=subprocess.DEVNULL,
                               stderr=(tmp_path / f"agent-{i}.log").open("ab")) for i in range(2)]
    try:
        return [a.wait(timeout=ROUND_SECONDS) for a in agents]
    finally:
        for a in agents:
            stop_process(a)


def test_rendered_torchrun_never_reruns_a_failed_round_and_every_relaunch_forms(tmp_path: Path) -> None:
    script, runs = tmp_path / "script.py", tmp_path / "runs.txt"
    script.write_text(SCRIPT)
    assert "--max-restarts=0" in agent_command(RDZV_PORT, script, runs, 0)
    port = free_port()
    codes = round_of_two(port, script, runs, 2, tmp_path)
    assert all(c != 0 for c in codes), codes
    log = (tmp_path / "agent-0.log").read_text() + (tmp_path / "agent-1.log").read_text()
    assert sorted(runs.read_text().splitlines()) == ["rank 0 restart 0", "rank 1 restart 0"], log[-3000:]
    for attempt in range(3):  # the operator's relaunches: fresh agents, the same endpoint
        runs.unlink()
        codes = round_of_two(port, script, runs, 0, tmp_path)
        log = (tmp_path / "agent-0.log").read_text() + (tmp_path / "agent-1.log").read_text()
        assert codes == [0, 0], f"relaunch {attempt + 1}: {codes}\n{log[-3000:]}"
        assert sorted(runs.read_text().splitlines()) == ["rank 0 restart 0", "rank 1 restart 0"]
