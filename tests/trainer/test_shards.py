"""kubetrain_trainer.shards: TokenShards reads what preparation's ShardWriter writes as fixed-length windows
(seq_length + 1 tokens), never across a shard boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from kubetrain_trainer.preparation import ShardWriter
from kubetrain_trainer.shards import TokenShards


def test_token_shards_pack_fixed_length_windows(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    w = ShardWriter(d, np.dtype(np.uint16), shard_tokens=25)
    w.write(np.arange(60, dtype=np.uint16))
    w.close({"tokenizer": "x"})
    shards = TokenShards(d, seq_length=8)
    # shards of 25, 25, 10 tokens → 3 + 3 + 1 windows of 8+1 tokens
    assert len(shards) == 7
    batch = shards.batch(np.array([0, 2, 3, 6]))
    assert batch[0].tolist() == list(range(0, 9))
    assert batch[1].tolist() == list(range(16, 25))
    assert batch[2].tolist() == list(range(25, 34))
    assert batch[3].tolist() == list(range(50, 59))
