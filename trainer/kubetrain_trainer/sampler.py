"""The sampler: which sequences each rank reads at each step, a pure function of (seed, step).

Step s uses global batch positions [s·G, (s+1)·G) of a seeded permutation of all sequences, re-drawn
every epoch. Each rank takes its contiguous slice of the global batch, so resuming needs only the
step, and the batch contents (the math) do not depend on the number of processes — a job may resume
with a different world size.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit avalanche hash (splitmix64 finaliser) of x and key; wraps on purpose."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated pointwise (Feistel network + cycle walking): O(1) memory
    however many sequences there are, unlike materialising a permutation of billions of indices."""
    if n <= 1:
        return positions.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    low_mask = np.uint64((1 << (bits // 2)) - 1)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & low_mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, key * 4 + r + 1) & low_mask)
        return (left << half) | right

    y = feistel(positions.astype(np.uint64))
    outside = y >= np.uint64(n)
    while outside.any():
        y[outside] = feistel(y[outside])
        outside = y >= np.uint64(n)
    return y.astype(np.int64)


def global_batch(step: int, global_batch_size: int, n: int, seed: int) -> np.ndarray:
    """Dataset indices of the global batch for optimizer step `step` (0-based)."""
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, within = np.divmod(positions, n)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = permute(within[sel], n, key=seed * 1_000_003 + int(epoch))
    return out


def rank_micro_batches(step: int, global_batch_size: int, micro_batch_size: int, n: int, seed: int,
                       rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's micro-batches for `step`: its contiguous slice of the global batch, split in order."""
    per_rank = global_batch_size // world_size
    mine = global_batch(step, global_batch_size, n, seed)[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def eval_micro_batches(n_eval: int, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """The first n_eval validation sequences, strided over ranks; summed losses are world-size independent."""
    mine = np.arange(rank, n_eval, world_size, dtype=np.int64)
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
