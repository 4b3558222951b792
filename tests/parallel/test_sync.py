"""The gradient-sync paths' pure parts: buckets, fixed-point arithmetic, one-process behaviour,
and which path the factory picks with its refusals.

The multi-rank behaviour is in test_mpi.py (tests/mpi/sync_paths.py, tests/mpi/fixed_point.py).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddtrain.config import load_config
from ddtrain.engine.model import build_model
from ddtrain.engine.params import FlatParams
from ddtrain.errors import ConfigError
from ddtrain.parallel.comm import SingleProcess
from ddtrain.parallel.sync import FixedPointAllreduce, OneProcess, StepFlags, make_sync
from ddtrain.parallel.sync.allreduce import make_buckets
from ddtrain.parallel.sync.fixed_point import INT_BITS, dequantize, fixed_point_exponent, quantize_add

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
    model = build_model([{"type": "linear", "out": 1}], (shards[0].size - 1,))
    sync = FixedPointAllreduce(SingleProcess(), model, n_shards=len(shards))
    for i in order:
        model.params.grad[...] = shards[i]
        sync.part_done()
    flags = sync.synchronize(StepFlags())
    return model.params.grad.copy() if not flags.nonfinite else None


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


def test_fixed_point_nonfinite_gradient_is_flagged():
    shards = [np.ones(4, np.float32), np.array([1, np.inf, 1, 1], np.float32)]
    assert _fixed_point_sum(shards, [0, 1]) is None


def test_one_process_leaves_the_gradient_and_checks_it():
    model = build_model([{"type": "linear", "out": 3}], (5,))
    sync = make_sync(load_config("tiny").dist, SingleProcess(), model, nonfinite="skip")
    assert isinstance(sync, OneProcess) and not sync.weights_can_differ and not sync.optimizer_checks
    model.params.grad[...] = 0.25
    assert sync.synchronize(StepFlags(stop=2)) == StepFlags(stop=2, nonfinite=0)
    assert (model.params.grad == 0.25).all() and sync.label == "none (one process)" and not sync.calls
    model.params.grad[3] = np.nan
    assert sync.synchronize(StepFlags()).nonfinite == 1


def test_with_nonfinite_stop_the_update_checks_instead_of_the_sync():
    """train.nonfinite=stop: the sync checks nothing and the optimizer's step reports a
    non-finite gradient; with skip the sync checks before the update, which must not."""
    from ddtrain.engine.optim import make_optimizer
    model = build_model([{"type": "linear", "out": 3}], (5,))
    stop = make_sync(load_config("tiny").dist, SingleProcess(), model)
    assert stop.optimizer_checks and stop.on_grads_ready is None
    opt = make_optimizer("sgd", stop.params, momentum=0.9)
    model.params.grad[...] = 0.25
    assert stop.synchronize(StepFlags()).nonfinite == 0 and opt.step(0.1, check=True) == 0
    model.params.grad[2] = -np.inf
    assert stop.synchronize(StepFlags()).nonfinite == 0  # not checked here any more
    assert opt.step(0.1, check=True) == 1 and opt.step(0.1) == 0  # unasked, no check


def test_deterministic_is_fixed_point_even_in_one_process():
    """One process must give the bits N ranks give: the same micro-shards, the same sum."""
    cfg = load_config("tiny", sets=["dist.deterministic=true"])
    sync = make_sync(cfg.dist, SingleProcess(), build_model([{"type": "linear", "out": 3}], (5,)))
    assert isinstance(sync, FixedPointAllreduce)
    assert sync.batch_parts(10) == [(a, b) for a, b in sync.batch_parts(10)] and len(sync.batch_parts(10)) == 8
    with pytest.raises(ConfigError, match="micro_shards"):
        class Two(SingleProcess):
            size = 2
        FixedPointAllreduce(Two(), build_model([{"type": "linear", "out": 3}], (5,)), n_shards=1)


def test_bucket_size_must_be_positive():
    from ddtrain.parallel.sync import MPIAllreduce
    with pytest.raises(ValueError, match="bucket_mb"):
        MPIAllreduce(SingleProcess(), build_model([{"type": "linear", "out": 3}], (5,)), overlap=True, bucket_mb=0)


def test_the_non_finite_check_covers_reported_and_unreported_layers():
    """Backward's reports check each layer's gradient while it is in cache; the sync point checks
    whatever was not reported; the next step starts clean."""
    model = build_model([{"type": "flatten"}, {"type": "linear", "out": 4}, {"type": "relu"},
                         {"type": "linear", "out": 3}], (1, 2, 3))
    sync = make_sync(load_config("tiny").dist, SingleProcess(), model, nonfinite="skip")
    last = model._first_offset[3]  # the last layer's first index
    for where, reported in ((0, [last]), (last + 1, [last]), (0, [last, 0]), (None, [last, 0]), (None, [])):
        model.params.grad[...] = 0.5
        if where is not None:
            model.params.grad[where] = np.inf
        for offset in reported:
            sync.on_grads_ready(offset)
        assert sync.synchronize(StepFlags()).nonfinite == (where is not None), (where, reported)
