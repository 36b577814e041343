"""kubetrain_trainer.sampler: the keyed permutation, global batches per step, each rank's micro-batches of
them, epochs, and the evaluation batches."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetrain_trainer.sampler import eval_micro_batches, global_batch, permute, rank_micro_batches


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2**31))
def test_permute_is_a_bijection(n: int, key: int) -> None:
    out = permute(np.arange(n), n, key)
    assert sorted(out.tolist()) == list(range(n))


def test_permute_depends_on_key() -> None:
    assert permute(np.arange(100), 100, 1).tolist() != permute(np.arange(100), 100, 2).tolist()


@settings(max_examples=40, deadline=None)
@given(step=st.integers(0, 1000), world=st.sampled_from([1, 2, 4, 8]), micro=st.sampled_from([1, 2, 4]),
       n=st.integers(64, 3000))
def test_rank_slices_concatenate_to_the_global_batch(step: int, world: int, micro: int, n: int) -> None:
    g = world * micro * 4
    parts = [np.concatenate(rank_micro_batches(step, g, micro, n, 9, r, world)) for r in range(world)]
    assert np.concatenate(parts).tolist() == global_batch(step, g, n, 9).tolist()
    assert all(len(m) == micro for r in range(world) for m in rank_micro_batches(step, g, micro, n, 9, r, world))


def test_each_epoch_visits_every_sequence_once_in_a_new_order() -> None:
    n, g = 96, 16
    epoch0 = np.concatenate([global_batch(s, g, n, 3) for s in range(6)])
    epoch1 = np.concatenate([global_batch(s, g, n, 3) for s in range(6, 12)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(n))
    assert epoch0.tolist() != epoch1.tolist()


def test_eval_batches_cover_the_eval_set_once_for_any_world_size() -> None:
    for world in (1, 2, 3, 8):
        seen = [i for r in range(world) for b in eval_micro_batches(50, 4, r, world) for i in b.tolist()]
        assert sorted(seen) == list(range(50))
