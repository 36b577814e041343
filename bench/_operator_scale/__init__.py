"""The parts of bench/operator_scale.py, one concern each:

  api          a plain aiohttp client of the API server: requests, CRD, namespaces, list-then-watch
  target       the cluster under test (given or started here), the pods' address and their /progress server
  meters       CPU of the processes involved, the API server's counters, the operator process itself
  contenders   the two contenders timed against each other: the bare client and the real operator
  runs         runs, attempts while disturbed, the alternating order
  report       the aims and the printed report
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# cluster.netns and cluster.controlplane come from the tests' own test bed.
sys.path.insert(0, str(ROOT / "tests"))
