"""The parts of bench/checkpoint_s3.py, one concern each:

  server       the moto_server (the tests' own) with its memory and CPU, the per-phase meter, the machine
  contenders   the model, kubetrain's loads' probe, and the baselines: save-then-upload, split upload,
               download-then-load
  run          the measurement: set-up, warm-up and the repeats (ABBA), printed as they go
  summary      medians, ratios and the table of aims
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# support.s3.MotoServer is the tests' own moto_server wrapper.
sys.path.insert(0, str(REPO / "tests"))

BUCKET = "bench"
MB = 1e6
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetrain-bench", "AWS_SECRET_ACCESS_KEY": "kubetrain-bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
