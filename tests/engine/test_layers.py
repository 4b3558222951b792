"""Layers: gradient checks, PyTorch parity for Linear, init schemes, buffer reuse, dropout masks."""

import math
import warnings

import numpy as np
import pytest

from tests.helpers import require

from ddtrain.engine.context import BatchContext
from ddtrain.engine.gradcheck import check_layer
from ddtrain.engine.layers import Dropout, Flatten, Linear, ReLU, Sigmoid, Tanh
from ddtrain.engine.model import Sequential

LAYER_CASES = [
    ("linear", lambda: Linear(4), (5,)),
    ("linear-no-bias", lambda: Linear(3, bias=False), (6,)),
    ("relu", ReLU, (7,)),
    ("relu-2d", ReLU, (2, 3)),
    ("tanh", Tanh, (7,)),
    ("sigmoid", Sigmoid, (2, 3)),
    ("flatten", Flatten, (2, 3, 2)),
    ("dropout", lambda: Dropout(0.4), (3, 4)),
]


@pytest.mark.parametrize("make, in_shape", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_layer_gradients_match_central_differences(make, in_shape):
    rows = check_layer(make(), in_shape, batch=3, seed=1)
    assert rows and rows[-1].param == "input"
    for row in rows:
        assert row.max_rel_error < 1e-6, row


def single_layer_model(layer, in_shape, dtype=np.float64, **kw):
    """A one-layer Sequential: the layer bound to its own flat buffers, dx computed."""
    return Sequential([layer], in_shape, dtype=dtype, input_grad=True, **kw)


def test_linear_forward_backward_match_torch():
    torch = require("torch", "torch is the comparison reference: pip install torch")
    rng = np.random.default_rng(0)
    model = single_layer_model(Linear(6), (5,))
    lin = model.layers[0]
    x = rng.standard_normal((4, 5))
    dy = rng.standard_normal((4, 6))
    y = lin.forward(x, train=True).copy()
    dx = model.backward(dy)

    ref = torch.nn.Linear(5, 6).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(lin.W))  # same (out, in) layout, no transpose
        ref.bias.copy_(torch.from_numpy(lin.b))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = ref(tx)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.dW, ref.weight.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.db, ref.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", ["pytorch", "he", "xavier"])
def test_linear_init_schemes_have_the_documented_ranges(scheme):
    fan_in, fan_out = 400, 300
    lin = single_layer_model(Linear(fan_out), (fan_in,), dtype=np.float32, init=scheme, seed=3).layers[0]
    w, b = lin.W, lin.b
    assert w.dtype == np.float32 and w.shape == (fan_out, fan_in)
    if scheme == "pytorch":
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
        assert np.abs(b).max() <= bound and b.std() > 0.5 * bound / math.sqrt(3)
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # std of U(-a, a)
    elif scheme == "he":
        assert w.std() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
        assert not b.any()
    else:
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert np.abs(w).max() <= bound and w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert not b.any()


def test_outputs_are_reused_buffers_and_follow_the_batch_shape():
    rng = np.random.default_rng(0)
    model = Sequential([Linear(8), ReLU(), Linear(3)], (5,), dtype=np.float32)
    x64 = rng.standard_normal((64, 5)).astype(np.float32)
    first = model.forward(x64, train=True)
    again = model.forward(x64, train=True)
    assert first is again  # steady state: the same buffer, no allocation
    x7 = x64[:7].copy()
    small = model.forward(x7, train=True)
    assert small.shape == (7, 3)
    np.testing.assert_allclose(small, model.forward(x64, train=True)[:7], rtol=1e-6)


def test_relu_tanh_sigmoid_values():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    np.testing.assert_array_equal(single_layer_model(ReLU(), (5,)).forward(x, True), [[0, 0, 0, 0.5, 2]])
    np.testing.assert_allclose(single_layer_model(Tanh(), (5,)).forward(x, True), np.tanh(x), rtol=1e-15)
    np.testing.assert_allclose(single_layer_model(Sigmoid(), (5,)).forward(x, True), 1 / (1 + np.exp(-x)),
                               rtol=1e-15)


def test_relu_passes_gradient_only_where_the_input_was_positive():
    model = single_layer_model(ReLU(), (4,))
    model.forward(np.array([[-1.0, 2.0, -3.0, 4.0]]), True)
    np.testing.assert_array_equal(model.backward(np.array([[10.0, 20.0, 30.0, 40.0]])), [[0, 20, 0, 40]])


def test_relu_matches_max_for_finite_nan_and_inf_and_masks_from_its_forward():
    """ReLU computes x * (x > 0): max(x, 0) for every x but -inf (NaN, so an overflow reaches
    the non-finite check); NaN stays NaN. backward uses forward's mask and writes dx over y."""
    model = single_layer_model(ReLU(), (6,), dtype=np.float32)
    x = np.array([[-3.0, -0.0, 0.0, 1.5, np.inf, np.nan]], np.float32)
    with np.errstate(invalid="ignore"):
        y = model.forward(x, True).copy()
    np.testing.assert_array_equal(y, [[0, 0, 0, 1.5, np.inf, np.nan]])
    with np.errstate(invalid="ignore"):
        assert np.isnan(model.forward(np.array([[-np.inf] * 6], np.float32), True)).all()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    y = model.forward(x, True).copy()
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    dy = rng.standard_normal((9, 6)).astype(np.float32)
    dx = model.backward(dy)
    np.testing.assert_array_equal(dx, dy * (x > 0))
    assert dx is model.layers[0]._y  # the spent forward output holds dx: one buffer fewer


def test_relu_after_linear_overwrites_the_linear_output_and_trains_the_same():
    """Sequential makes a ReLU that follows a Linear in place (the Linear keeps no output): the
    step's arithmetic is unchanged, bit for bit, against the same model with every ReLU on a
    buffer of its own."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    dy = rng.standard_normal((16, 3)).astype(np.float32)
    outs = []
    for inplace in (True, False):
        model = Sequential([Linear(8), ReLU(), Linear(8), ReLU(), Linear(3)], (6,), dtype=np.float32, seed=4)
        assert [l.inplace for l in model.layers if isinstance(l, ReLU)] == [True, True]
        if not inplace:
            for layer in model.layers:
                if isinstance(layer, ReLU):
                    layer.inplace = False
        for _ in range(2):  # the second step reuses every buffer
            y = model.forward(x, True).copy()
            model.backward(dy)
        if inplace:
            assert model.layers[1]._y is model.layers[0]._buf("y", (16, 8), np.float32, order="F")
        outs.append((y, model.params.grad.copy()))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert not ReLU().inplace  # on its own (gradient checks, other layers before it): its own buffer


def test_linear_bias_gradient_is_the_batch_sum_for_every_batch_size():
    rng = np.random.default_rng(1)
    model = Sequential([Linear(7)], (5,), dtype=np.float64, input_grad=True)
    for n in (1, 4, 33, 4):  # a new batch size gets its own ones vector, an old one reuses it
        x, dy = rng.standard_normal((n, 5)), rng.standard_normal((n, 7))
        model.forward(x, True)
        model.backward(dy)
        np.testing.assert_allclose(model.layers[0].db, dy.sum(axis=0), rtol=1e-13, atol=1e-14)


def test_sigmoid_is_stable_for_huge_inputs():
    model = single_layer_model(Sigmoid(), (4,), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exp overflow would warn
        y = model.forward(np.array([[-1e4, -100.0, 100.0, 1e4]], np.float32), True)
    np.testing.assert_array_equal(y, [[0, 0, 1, 1]])


def test_flatten_is_a_view_and_backward_restores_the_shape():
    model = single_layer_model(Flatten(), (2, 3))
    x = np.arange(12.0).reshape(2, 2, 3)
    y = model.forward(x, True)
    assert y.shape == (2, 6) and np.shares_memory(x, y)
    assert model.backward(np.ones((2, 6))).shape == (2, 2, 3)


# -- dropout ---------------------------------------------------------------------------------

def dropout_at(index, p=0.3):
    """A Dropout sitting at `index` of a model (its masks are seeded with the index)."""
    layers = [ReLU() for _ in range(index)] + [Dropout(p)]
    return Sequential(layers, (6,), dtype=np.float64).layers[index]


def test_dropout_mask_is_the_documented_row_of_the_global_draw():
    seed, step, index, global_batch, p = 7, 11, 2, 10, 0.3
    drop = dropout_at(index, p)
    drop.set_batch_context(BatchContext(seed, step, 0, global_batch))
    mask = drop.host_mask(global_batch, (6,), np.float64)
    u = np.random.default_rng([seed, step, index]).random((global_batch, 6))
    np.testing.assert_array_equal(mask, np.where(u >= p, 1 / (1 - p), 0.0))


@pytest.mark.parametrize("splits", [[10], [5, 5], [3, 3, 4], [1, 2, 3, 4]])
def test_dropout_masks_do_not_depend_on_how_the_batch_is_split(splits):
    """Every rank count must drop the same units of the same samples."""
    seed, step, global_batch = 1, 4, 10
    x = np.random.default_rng(0).standard_normal((global_batch, 6)) + 5.0  # no zeros
    full = dropout_at(1)
    full.set_batch_context(BatchContext(seed, step, 0, global_batch))
    expected = full.forward(x, train=True).copy()
    offset, parts = 0, []
    for n in splits:
        rank_layer = dropout_at(1)
        rank_layer.set_batch_context(BatchContext(seed, step, offset, global_batch))
        parts.append(rank_layer.forward(x[offset:offset + n], train=True).copy())
        offset += n
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_dropout_scales_kept_units_changes_per_step_and_is_identity_in_eval():
    drop = dropout_at(0, p=0.5)
    x = np.ones((200, 6))
    drop.set_batch_context(BatchContext(0, 0, 0, 200))
    y0 = drop.forward(x, train=True).copy()
    assert set(np.unique(y0)) == {0.0, 2.0}
    assert 0.4 < (y0 == 0).mean() < 0.6
    drop.set_batch_context(BatchContext(0, 1, 0, 200))
    assert not np.array_equal(drop.forward(x, train=True), y0)
    assert drop.forward(x, train=False) is x
    assert drop.backward(x) is x


def test_dropout_without_a_batch_context_says_what_to_call():
    with pytest.raises(RuntimeError, match="set_batch_context"):
        dropout_at(0).forward(np.ones((2, 6)), train=True)


def test_dropout_rejects_rows_outside_the_global_batch():
    drop = dropout_at(0)
    drop.set_batch_context(BatchContext(0, 0, 8, 10))
    with pytest.raises(ValueError, match="outside the global batch"):
        drop.forward(np.ones((4, 6)), train=True)


def test_buffer_pool_shares_row_major_arrays_along_the_batch_axis():
    """A smaller batch gets a view of the first rows of the larger batch's array (no second
    set of activations); a larger one replaces it; column-major arrays stay one per shape."""
    from ddtrain.engine.layers import BufferPool, memory_order
    pool = BufferPool()
    big = pool.get(np, "y", (128, 4, 5, 6), np.float32, "NHWC")
    small = pool.get(np, "y", (96, 4, 5, 6), np.float32, "NHWC")
    assert small.shape == (96, 4, 5, 6) and np.shares_memory(big, small) and memory_order(small) == "NHWC"
    assert pool.get(np, "y", (128, 4, 5, 6), np.float32, "NHWC") is big
    rows = pool.get(np, "h", (16, 3), np.float32)
    assert pool.get(np, "h", (4, 3), np.float32).flags.c_contiguous
    larger = pool.get(np, "h", (32, 3), np.float32)
    assert larger.shape == (32, 3) and not np.shares_memory(rows, larger)
    f_big, f_small = pool.get(np, "z", (8, 3), np.float32, "F"), pool.get(np, "z", (4, 3), np.float32, "F")
    assert f_small.flags.f_contiguous and not np.shares_memory(f_big, f_small)
    assert pool.get(np, "y", (96, 4, 5, 7), np.float32, "NHWC").shape == (96, 4, 5, 7)  # other axes differ: its own
