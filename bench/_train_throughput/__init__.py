"""The parts of bench/train_throughput.py, one concern each:

  workers      the bare PyTorch loop and transformers.Trainer, each run in its own process
  kubetrain    kubetrain itself, as users run it (`kubetrain run job.yaml`), read back from events.jsonl
  driver       the data, the rounds of interleaved contenders, re-measured while the machine is contended
  report       the table, the notes and the targets
"""

import sys
from pathlib import Path

SEQ = 256
MICRO = 8
GLOBAL = 16
LR = 0.002
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
LR_WARMUP = 30
MIN_LR_RATIO = 0.1
CLIP = 1.0
SEED = 1234
EVAL_SEQUENCES = 64  # quality parity: every contender's validation loss over the first 64 validation sequences
THREADS = 2
CONTENDED = 0.05  # other processes used more than this share of the machine during a measurement

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "train_throughput.py"  # each worker is this script again, with --worker
BIN = Path(sys.executable).parent
