"""The reducer's pure parts: buckets, fixed-point arithmetic, and one-process behaviour.

The multi-rank behaviour is in test_mpi.py (tests/mpi/reducer.py, tests/mpi/fixed_point.py).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddtrain.parallel.comm import SingleProcess
from ddtrain.parallel.reducer import (INT_BITS, GradientReducer, dequantize, fixed_point_exponent, make_buckets,
                                  quantize_add)
from ddtrain.engine.params import FlatParams

MLP = [("1.weight", (512, 784)), ("1.bias", (512,)), ("3.weight", (512, 512)), ("3.bias", (512,)),
       ("5.weight", (10, 512)), ("5.bias", (10,))]


def test_buckets_cover_the_buffer_from_the_end_in_whole_slots():
    params = FlatParams(MLP)
    buckets = make_buckets(params.slots, 2**20, 4)
    edges = {s.start for s in params.slots} | {params.size}
    assert buckets[0][1] == params.size and buckets[-1][0] == 0
    for (a, b), (c, d) in zip(buckets, buckets[1:]):
        assert d == a  # contiguous, last first
    assert all(a in edges and b in edges for a, b in buckets)
    # 5.* (5130 floats) is too small alone, so it joins 3.bias and 3.weight
    assert buckets[0] == (params.slots[2].start, params.size)
    assert len(make_buckets(params.slots, 1e12, 4)) == 1
    assert make_buckets(params.slots, 1, 4) == [(s.start, s.stop) for s in reversed(params.slots)]
    assert make_buckets([], 1, 4) == []


def test_fixed_point_exponent_leaves_room_for_the_sum():
    assert fixed_point_exponent(0.0, 8) == 0
    for max_abs in (1e-30, 3e-4, 0.5, 1.0, 7.0, 3e30):
        for n in (1, 2, 3, 8, 1000):
            e = fixed_point_exponent(max_abs, n)
            assert n * max_abs * 2.0**e <= 2.0**INT_BITS < 2.0**63
            assert n * max_abs * 2.0**(e + 1) > 2.0**INT_BITS / 2  # and not wastefully small
    with pytest.raises(ValueError, match="finite"):
        fixed_point_exponent(math.inf, 2)


def test_quantize_then_dequantize_is_near_exact():
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(10_000) * 10.0 ** rng.uniform(-8, 3, 10_000)).astype(np.float32)
    e = fixed_point_exponent(float(np.abs(g).max()), 1)
    acc = np.zeros(g.size, dtype=np.int64)
    quantize_add(acc, g, e)
    out = np.empty_like(g)
    dequantize(acc, e, out)
    # entries above 2**-e survive bit for bit; smaller ones are rounded to a multiple of 2**-e
    big = np.abs(g) > 2.0 ** (24 - e)
    assert np.array_equal(out[big], g[big])
    assert np.abs(out - g).max() <= 2.0 ** -e


def test_worst_case_sum_does_not_overflow():
    n = 5
    g = np.full(3, np.finfo(np.float32).max, dtype=np.float32) * np.array([1, -1, 1], dtype=np.float32)
    e = fixed_point_exponent(float(np.abs(g).max()), n)
    acc = np.zeros(3, dtype=np.int64)
    for _ in range(n):
        quantize_add(acc, g, e)
    out = np.empty(3, dtype=np.float64)
    dequantize(acc, e, out)
    np.testing.assert_allclose(out, g.astype(np.float64) * n, rtol=1e-12)


def _fixed_point_sum(shards, order):
    params = FlatParams([("w", (shards[0].size,))])
    reducer = GradientReducer(SingleProcess(), params, mode="fixed_point")
    for i in order:
        params.grad[...] = shards[i]
        reducer.add_shard(params.grad)
    reducer.finish()
    return params.grad.copy()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9), data=st.data())
def test_fixed_point_sum_is_independent_of_order(seed, n, data):
    rng = np.random.default_rng(seed)
    shards = [(rng.standard_normal(300) * 10.0 ** rng.uniform(-7, 4, 300)).astype(np.float32) for _ in range(n)]
    order = data.draw(st.permutations(range(n)))
    a, b = _fixed_point_sum(shards, range(n)), _fixed_point_sum(shards, order)
    assert a.tobytes() == b.tobytes()
    # accurate to the float32 rounding of the result plus half a quantum per shard
    e = fixed_point_exponent(max(float(np.abs(g).max()) for g in shards), n)
    np.testing.assert_allclose(a, np.sum(np.stack(shards).astype(np.float64), axis=0), rtol=1e-6,
                               atol=n * 2.0 ** -(e + 1))


def test_float32_sums_do_depend_on_order():
    """Why fixed point exists: the same shards summed in float32 in two orders differ."""
    rng = np.random.default_rng(1234)
    shards = [(rng.standard_normal(5000) * 10.0 ** rng.uniform(-6, 2, 5000)).astype(np.float32) for _ in range(12)]
    forward = np.zeros(5000, np.float32)
    for s in shards:
        forward += s
    backward = np.zeros(5000, np.float32)
    for s in reversed(shards):
        backward += s
    assert hashlib.sha256(forward).digest() != hashlib.sha256(backward).digest()
    assert _fixed_point_sum(shards, range(12)).tobytes() == _fixed_point_sum(shards, range(11, -1, -1)).tobytes()


def test_fixed_point_nonfinite_gradient_becomes_nan_everywhere():
    shards = [np.ones(4, np.float32), np.array([1, np.inf, 1, 1], np.float32)]
    assert np.isnan(_fixed_point_sum(shards, [0, 1])).all()


def test_one_process_sum_mode_is_free_and_leaves_the_gradient():
    params = FlatParams(MLP)
    params.grad[...] = 0.25
    reducer = GradientReducer(SingleProcess(), params, bucket_mb=0.1)
    reducer.grads_ready(params.slots[4].start)
    reducer.grads_ready(0)
    assert reducer.finish() == 0.0 and not reducer.pending
    assert (params.grad == 0.25).all()


def test_bad_arguments():
    params = FlatParams(MLP)
    with pytest.raises(ValueError, match="mode"):
        GradientReducer(SingleProcess(), params, mode="mean")
    with pytest.raises(ValueError, match="bucket_mb"):
        GradientReducer(SingleProcess(), params, bucket_mb=0)
    with pytest.raises(RuntimeError, match="fixed_point"):
        GradientReducer(SingleProcess(), params).add_shard(params.grad)
