"""The data order: the same global batches for any world size, each rank a contiguous slice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddtrain.data.order import (
    epoch_permutation,
    global_batch_indices,
    micro_shards,
    rank_micro_shards,
    rank_slice,
    steps_per_epoch,
)


def test_permutation_depends_only_on_seed_and_epoch():
    a = epoch_permutation(7, 3, 1000)
    assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, epoch_permutation(7, 3, 1000))
    np.testing.assert_array_equal(a, np.random.default_rng([7, 3]).permutation(1000))
    assert not np.array_equal(a, epoch_permutation(7, 4, 1000))
    assert not np.array_equal(a, epoch_permutation(8, 3, 1000))
    # seeding with the pair, not the sum: (seed, epoch) = (7, 3) and (8, 2) differ
    assert not np.array_equal(a, epoch_permutation(8, 2, 1000))


def test_permutation_rejects_negative_seed():
    with pytest.raises(ValueError):
        epoch_permutation(-1, 0, 10)


@pytest.mark.parametrize(
    "n, b, drop_last, steps",
    [(10, 3, False, 4), (10, 3, True, 3), (9, 3, True, 3), (9, 3, False, 3), (2, 3, True, 0), (0, 4, False, 0)],
)
def test_steps_per_epoch(n, b, drop_last, steps):
    assert steps_per_epoch(n, b, drop_last) == steps


def test_global_batches_keep_or_drop_the_partial_batch():
    perm = np.arange(10)
    assert global_batch_indices(perm, 3, 3, 10, drop_last=False).tolist() == [9]
    assert global_batch_indices(perm, 2, 3, 10, drop_last=True).tolist() == [6, 7, 8]
    with pytest.raises(ValueError):
        global_batch_indices(perm, 3, 3, 10, drop_last=True)
    with pytest.raises(ValueError):
        global_batch_indices(perm, 0, 3, 11, drop_last=True)


def test_rank_slice_examples():
    assert [rank_slice(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [rank_slice(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError):
        rank_slice(10, 4, 4)
    with pytest.raises(ValueError):
        rank_slice(10, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 300),
    global_batch=st.integers(1, 64),
    size=st.integers(1, 17),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 50),
)
def test_ranks_together_cover_each_global_batch_exactly(n, global_batch, size, drop_last, seed, epoch):
    perm = epoch_permutation(seed, epoch, n)
    steps = steps_per_epoch(n, global_batch, drop_last)
    seen = []
    for k in range(steps):
        batch = global_batch_indices(perm, k, global_batch, n, drop_last)
        assert len(batch) == global_batch or (not drop_last and k == steps - 1 and len(batch) < global_batch)
        parts = [rank_slice(len(batch), r, size) for r in range(size)]
        lengths = [stop - start for start, stop in parts]
        assert max(lengths) - min(lengths) <= 1
        assert lengths == sorted(lengths, reverse=True)  # the first ranks get the extra sample
        # contiguous, in rank order, no gap, no overlap: concatenation is the batch itself
        assert parts[0][0] == 0 and parts[-1][1] == len(batch)
        assert all(parts[r][1] == parts[r + 1][0] for r in range(size - 1))
        union = np.concatenate([batch[a:b] for a, b in parts])
        np.testing.assert_array_equal(union, batch)
        seen.extend(union.tolist())
    # over the epoch: every sample once, except the dropped tail
    expected = n - (n % global_batch if drop_last else 0)
    assert len(seen) == len(set(seen)) == expected
    assert set(seen) <= set(range(n))


@settings(max_examples=200, deadline=None)
@given(batch_len=st.integers(0, 300), n_micro=st.integers(1, 40), size=st.integers(1, 17))
def test_micro_shards_are_fixed_and_ranks_cover_them(batch_len, n_micro, size):
    shards = micro_shards(batch_len, n_micro)
    assert len(shards) == n_micro
    assert shards[0][0] == 0 and shards[-1][1] == batch_len
    assert all(shards[i][1] == shards[i + 1][0] for i in range(n_micro - 1))
    lengths = [b - a for a, b in shards]
    assert max(lengths) - min(lengths) <= 1
    runs = [rank_micro_shards(n_micro, r, size) for r in range(size)]
    assert [i for run in runs for i in run] == list(range(n_micro))
    counts = [len(run) for run in runs]
    assert max(counts) - min(counts) <= 1
    # each rank's samples form one contiguous slice of the batch
    for run in runs:
        if len(run):
            assert shards[run[0]][0] <= shards[run[-1]][1]
            assert all(shards[i][1] == shards[i + 1][0] for i in run[:-1])


def test_micro_shards_do_not_depend_on_world_size():
    # the shards a rank computes are literally the same (start, stop) pairs whatever the size
    shards = micro_shards(100, 8)
    for size in (1, 2, 3, 8):
        got = [shards[i] for r in range(size) for i in rank_micro_shards(8, r, size)]
        assert got == shards
