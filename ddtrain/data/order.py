"""The data order as a pure function of (seed, epoch, global batch size).

This is what makes a run independent of the number of ranks: every rank computes
the same epoch permutation and the same global batches from nothing but the seed,
the epoch and the step, and then takes only its own contiguous slice of each global
batch. Gradients summed over ranks (and divided by the global batch length) are then
the single-process gradient of that global batch, whatever the world size.

    perm  = epoch_permutation(seed, epoch, n)                  # same on every rank
    batch = global_batch_indices(perm, k, B, n, drop_last)     # same on every rank
    start, stop = rank_slice(len(batch), rank, size)           # this rank's part
    idx = batch[start:stop]                                    # may be empty

Nothing here touches MPI, so all of it is tested in one process.

Bitwise-identical weights for any world size need one more step (floating-point sums
depend on how a batch is split): split every global batch into `n_micro` fixed
micro-shards that do not depend on the world size (`micro_shards`), give each rank a
contiguous run of them (`rank_micro_shards`), compute one gradient per micro-shard,
and sum the micro-shard gradients in shard order (e.g. gather them and add on every
rank). The per-shard work is then identical for every world size.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` training samples in `epoch`: int64 array (n,).

    Depends only on (seed, epoch, n); seed and epoch must be >= 0. Seeding with the
    pair (not seed + epoch) keeps epochs of neighbouring seeds unrelated.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n: int, global_batch: int, drop_last: bool) -> int:
    """Global batches in one epoch of `n` samples.

    drop_last: a final partial batch is skipped (floor) or kept (ceil). With drop_last
    and n < global_batch this is 0; the caller must reject that configuration.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    return n // global_batch if drop_last else -(-n // global_batch)


def global_batch_indices(
    perm: np.ndarray, step_in_epoch: int, global_batch: int, n: int, drop_last: bool
) -> np.ndarray:
    """Sample indices of global batch `step_in_epoch`: perm[k*B:(k+1)*B] (a view).

    perm: (n,) from `epoch_permutation`. The last batch is shorter than B when
    drop_last is False and B does not divide n. step_in_epoch must be in
    [0, steps_per_epoch(n, B, drop_last)).
    """
    if len(perm) != n:
        raise ValueError(f"perm has {len(perm)} entries, expected n={n}")
    steps = steps_per_epoch(n, global_batch, drop_last)
    if not 0 <= step_in_epoch < steps:
        raise ValueError(f"step_in_epoch {step_in_epoch} out of range [0, {steps})")
    start = step_in_epoch * global_batch
    return perm[start : min(start + global_batch, n)]


def _split(length: int, parts: int, i: int) -> tuple[int, int]:
    """Part `i` of `length` items cut into `parts` contiguous parts.

    Sizes differ by at most one; the first ``length % parts`` parts get the extra item.
    """
    if parts < 1:
        raise ValueError(f"number of parts must be >= 1, got {parts}")
    if not 0 <= i < parts:
        raise ValueError(f"part {i} out of range [0, {parts})")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    q, r = divmod(length, parts)
    start = i * q + min(i, r)
    return start, start + q + (i < r)


def rank_slice(batch_len: int, rank: int, size: int) -> tuple[int, int]:
    """(start, stop) of `rank`'s contiguous part of a global batch of `batch_len`.

    Parts over ranks 0..size-1 tile [0, batch_len) in order; their lengths differ by
    at most one (the first ``batch_len % size`` ranks get one more). With
    batch_len < size the last ranks get empty parts (start == stop): allowed, such a
    rank contributes a zero gradient.
    """
    return _split(batch_len, size, rank)


def micro_shards(batch_len: int, n_micro: int) -> list[tuple[int, int]]:
    """The fixed micro-shards [(start, stop)] * n_micro of a global batch.

    Independent of the world size (that is their point); they tile [0, batch_len) in
    order with lengths differing by at most one; some are empty when
    batch_len < n_micro.
    """
    return [_split(batch_len, n_micro, i) for i in range(n_micro)]


def rank_micro_shards(n_micro: int, rank: int, size: int) -> range:
    """Indices of the micro-shards `rank` computes: a contiguous run, balanced over ranks.

    Runs over ranks 0..size-1 tile range(n_micro) in order; empty for the last ranks
    when n_micro < size. Rank r's samples are then the concatenation of its shards'
    (start, stop), itself one contiguous slice of the batch.
    """
    start, stop = _split(n_micro, size, rank)
    return range(start, stop)
