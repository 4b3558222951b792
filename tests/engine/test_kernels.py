"""The two implementations of the max-pool, BatchNorm and SGD loops (ddtrain.engine.kernels) give
the same bits: window maxima, winners (ties, -inf, NaN), input gradients (overlapping windows,
padding, floor sizes), BatchNorm's outputs and gradients in train and eval mode, on both
layouts and dtypes, on a team of 2, and in whole CNN steps; SGD's parameters and momentum over
steps with every option, on this machine's BLAS and on the fused and unfused roundings, and
the non-finite check. Also which one a process runs, and what DDTRAIN_KERNELS does."""

import itertools

import numpy as np
import pytest

from ddtrain.benchmarks.cnn import layers as bench_layers
from ddtrain.config import load_config
from ddtrain.engine import conv, kernels
from ddtrain.engine.context import single_batch
from ddtrain.engine.layers import memory_order
from ddtrain.engine.conv import MaxPool2d
from ddtrain.engine.losses import make_loss
from ddtrain.engine.model import build_model
from ddtrain.engine.team import Team
from ddtrain.errors import ConfigError
from tests.helpers import require

GEOMETRIES = [(k, s, p) for k, s, p in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2)) if p <= k // 2]


@pytest.fixture(scope="module")
def compiled():
    require("numba", "the compiled kernels need numba: pip install 'ddtrain[fast]'")
    return kernels.Compiled()


def _input(rng, shape, layout, dtype, ties):
    n, c, h, w = shape
    a = rng.standard_normal(shape)
    if ties:  # a few distinct values: most windows hold equal maxima
        a = np.round(a)
        a[a < -1.5] = -np.inf
    if layout == "NHWC":
        x = np.empty((n, h, w, c), dtype).transpose(0, 3, 1, 2)
    else:
        x = np.empty(shape, dtype)
    x[...] = a
    return x


def _pool(impl, x, k, s, p, train=True, team=1):
    layer = type("Pool", (MaxPool2d,), {"kernels": impl})(k, s, p)
    layer.team = Team(team)
    y = layer.forward(x, train).copy()
    arg = None if layer._arg is None else layer._arg.copy()
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    return y, arg, dx.copy(), memory_order(dx)


@pytest.mark.parametrize("k, s, p", GEOMETRIES)
def test_compiled_max_pool_gives_the_reference_bits(compiled, k, s, p):
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    for shape, layout, dtype, ties in [((3, 4, 9, 7), "NHWC", np.float32, True),
                                       ((2, 3, 8, 11), "C", np.float64, False),
                                       ((1, 5, 6, 6), "NHWC", np.float64, False),
                                       ((4, 2, 7, 10), "C", np.float32, True)]:
        if (shape[2] + 2 * p - k) < 0 or (shape[3] + 2 * p - k) < 0:
            continue
        x = _input(rng, shape, layout, dtype, ties)
        ref, ours = _pool(kernels.Reference(), x, k, s, p), _pool(compiled, x, k, s, p)
        np.testing.assert_array_equal(ours[0], ref[0])  # the maxima
        np.testing.assert_array_equal(ours[1], ref[1])  # the winners
        np.testing.assert_array_equal(ours[2], ref[2])  # the input gradient
        assert ours[3] == ref[3] == memory_order(x)


def test_nan_propagates_as_in_the_reference(compiled):
    x = _input(np.random.default_rng(0), (2, 3, 6, 6), "NHWC", np.float32, False)
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 0, 0] = np.nan
    x[0, 0, 4:6, 4:6] = -np.inf  # a window of -inf only: offset 0 keeps it (the 2x2 loop starts there)
    x[1, 0, 2, 2] = -np.inf  # -inf at a window's offset 0, beaten by the next
    for k, s, p in [(2, 2, 0), (3, 1, 1)]:
        ref, ours = _pool(kernels.Reference(), x, k, s, p), _pool(compiled, x, k, s, p)
        assert np.isnan(ref[0]).any()
        np.testing.assert_array_equal(ours[0], ref[0])  # NaN where the reference has NaN
        np.testing.assert_array_equal(ours[1], ref[1])


def test_eval_forward_then_backward_and_a_team_of_two(compiled):
    x = _input(np.random.default_rng(1), (37, 8, 28, 28), "NHWC", np.float32, True)
    ref = _pool(kernels.Reference(), x, 2, 2, 0, train=False)
    for team in (1, 2):
        ours = _pool(compiled, x, 2, 2, 0, train=False, team=team)
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(ours[2], ref[2])


def _step(specs):
    model = build_model(specs, (1, 28, 28), seed=0, input_grad=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 37)
    model.set_batch_context(single_batch(0, 0, 37))
    loss = make_loss("cross_entropy")
    logits = model.forward(x, train=True).copy()
    loss.forward(logits, y)
    dx = model.backward(loss.backward(1.0 / 37)).copy()
    return logits, dx, model.params.grad.copy()


@pytest.mark.parametrize("name", ["cnn", "bench-cnn", "bench-cnn-bn"])
def test_a_cnn_step_is_the_same_with_either(compiled, monkeypatch, name):
    specs = bench_layers(batchnorm=name.endswith("bn")) if name.startswith("bench") else load_config(name).model.layers
    # Winograd where auto picks it with compiled loops, so both sides run the same algorithm
    specs = [{**s, "algorithm": "winograd"} if s["type"] == "conv2d" and s["out"] >= 64 else s for s in specs]
    monkeypatch.setattr(kernels, "for_array_module", lambda xp: compiled)  # every layer's loops
    ours = _step(specs)
    monkeypatch.setattr(kernels, "for_array_module", lambda xp: kernels.Reference())
    ref = _step(specs)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_the_choice(monkeypatch):
    kernels.for_array_module.cache_clear()
    try:
        monkeypatch.setenv(kernels.ENV, "numpy")
        assert type(kernels.for_array_module(np)) is kernels.Reference
        kernels.for_array_module.cache_clear()
        monkeypatch.setenv(kernels.ENV, "fortran")
        with pytest.raises(ConfigError, match="DDTRAIN_KERNELS must be one of numba, numpy"):
            kernels.for_array_module(np)
        kernels.for_array_module.cache_clear()
        monkeypatch.delenv(kernels.ENV)
        expected = kernels.Compiled if kernels.numba_available() else kernels.Reference
        assert type(kernels.for_array_module(np)) is expected
        assert type(kernels.for_array_module(object())) is kernels.Reference  # CuPy's arrays, say
    finally:
        kernels.for_array_module.cache_clear()


def _batchnorm(impl, x, train, team=1):
    from ddtrain.engine.norm import BatchNorm1d, BatchNorm2d
    cls = BatchNorm2d if x.ndim == 4 else BatchNorm1d
    layer = type("BN", (cls,), {"kernels": impl})()
    layer.team = Team(team)
    c = x.shape[1]
    rng = np.random.default_rng(3)
    params = {"weight": rng.standard_normal(c).astype(x.dtype), "bias": rng.standard_normal(c).astype(x.dtype)}
    grads = {"weight": np.zeros(c, x.dtype), "bias": np.zeros(c, x.dtype)}
    layer.bind(params, grads)
    layer.bind_buffers({"running_mean": np.full(c, 0.1, np.float32), "running_var": np.full(c, 2.0, np.float32),
                        "num_batches_tracked": np.zeros((), np.int64)})
    layer.set_batch_context(single_batch(0, 0, x.shape[0]))
    y = layer.forward(x, train)
    dy = np.empty_like(y)
    dy[...] = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    return y.copy(), dx.copy(), grads["weight"].copy(), grads["bias"].copy()


@pytest.mark.parametrize("train", [True, False])
def test_compiled_batchnorm_passes_give_the_reference_bits(compiled, train):
    rng = np.random.default_rng(7)
    for shape, layout, dtype in [((37, 32, 28, 28), "NHWC", np.float32), ((3, 5, 7, 9), "NHWC", np.float64),
                                 ((4, 6, 5, 5), "C", np.float32), ((9, 12), "C", np.float32)]:
        if len(shape) == 4:
            x = _input(rng, shape, layout, dtype, False)
        else:
            x = rng.standard_normal(shape).astype(dtype)
        for team in (1, 2):
            ref, ours = _batchnorm(kernels.Reference(), x, train), _batchnorm(compiled, x, train, team)
            for a, b in zip(ours, ref):
                np.testing.assert_array_equal(a, b)


SGD_OPTIONS = [dict(momentum=m, nesterov=n, weight_decay=wd)
               for m, n, wd in itertools.product((0.0, 0.9), (False, True), (0.0, 5e-4)) if m or not n]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_compiled_sgd_gives_the_reference_bits(compiled, options):
    """Four steps (the first one makes the momentum) with changing learning rates, from the
    same vectors: equal parameters and momentum after each, with the BLAS kernels numpy runs."""
    rng = np.random.default_rng(3)
    n = 10_007  # not a multiple of any vector width
    p0 = rng.standard_normal(n).astype(np.float32)
    runs = {}
    for impl in (kernels.Reference(), compiled):
        p, buf = p0.copy(), np.empty(n, np.float32)
        temps = {}
        seen = []
        for step, lr in enumerate((0.1, 0.05, 0.0125, 3e-4)):
            g = np.random.default_rng(step).standard_normal(n).astype(np.float32)
            bad = impl.sgd(p, g, buf, lr=lr, first=step == 0, check=True,
                           temps=lambda k: temps.setdefault(k, np.empty(n, np.float32)), **options)
            assert bad == 0
            seen.append((p.copy(), buf.copy() if options["momentum"] else None))
        runs[impl.name] = seen
    for (p_ref, b_ref), (p_ours, b_ours) in zip(runs["numpy"], runs["numba"]):
        assert np.array_equal(p_ref, p_ours)
        assert b_ref is None or np.array_equal(b_ref, b_ours)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_sgd_rounds_as_the_blas_axpby_does(compiled, fused):
    """axpby fuses multiply and add on some BLAS kernels (OpenBLAS SkylakeX) and not on others
    (Haswell): the compiled loop gives each one's bits, checked against float64 arithmetic."""
    rng = np.random.default_rng(9)
    p, g = rng.standard_normal(4096).astype(np.float32), rng.standard_normal(4096).astype(np.float32)
    buf = rng.standard_normal(4096).astype(np.float32)
    lr, m = np.float32(-0.0123), np.float32(0.9)
    b = (g + buf * m).astype(np.float32)  # two roundings, as every axpby(1, x, m, y)
    if fused:
        expected = (p.astype(np.float64) + np.float64(lr) * b.astype(np.float64)).astype(np.float32)
    else:
        expected = p + b * lr
    compiled._k.sgd_update(p, g, buf, m, np.float32(0), lr, True, False, False, fused)
    assert np.array_equal(buf, b) and np.array_equal(p, expected)


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_the_sgd_check_finds_every_nan_and_infinity_and_nothing_else(impl):
    if impl == "numba":
        require("numba", "the compiled kernels need numba: pip install 'ddtrain[fast]'")
    k = kernels.Compiled() if impl == "numba" else kernels.Reference()
    big = np.finfo(np.float32)
    for value, bad in ((np.nan, 1), (np.inf, 1), (-np.inf, 1), (-np.nan, 1), (big.max, 0), (-big.max, 0),
                       (big.tiny / 4, 0), (1e19, 0), (0.0, 0)):
        for where in (0, 16, 1000):
            g = np.ones(1001, np.float32)
            g[where] = value
            p, buf = np.zeros(1001, np.float32), np.zeros(1001, np.float32)
            got = k.sgd(p, g, buf, momentum=0.9, nesterov=False, weight_decay=0.0, lr=0.1, first=True,
                        temps=lambda i: np.empty(1001, np.float32), check=True)
            assert got == bad, (impl, value, where)
            assert k.sgd(p, g, buf, momentum=0.9, nesterov=False, weight_decay=0.0, lr=0.1, first=False,
                         temps=lambda i: np.empty(1001, np.float32), check=False) == 0


def _array(shape, layout, values):
    """`values` in a new array of that memory layout ("strided": every other channel of a
    larger one, contiguous in no order)."""
    if layout == "NHWC":
        a = np.empty((shape[0], shape[2], shape[3], shape[1]), np.float32).transpose(0, 3, 1, 2)
    elif layout == "strided":
        a = np.empty((shape[0], shape[1] * 2, *shape[2:]), np.float32)[:, ::2]
    else:
        a = np.empty(shape, np.float32, order=layout)
    a[...] = values
    return a


@pytest.mark.parametrize("layout", ["C", "F", "NHWC", "strided"])
def test_compiled_relu_gives_the_reference_bits(compiled, layout):
    """Forward and backward, in place and not, with NaN, infinities and signed zeros; on a team of
    2 for a large array; a gradient in the output's memory order and in another one."""
    from ddtrain.engine.layers import ReLU
    rng = np.random.default_rng(4)
    shape = (300, 40, 7, 9) if layout in ("NHWC", "strided") else (1000, 300)
    values = rng.standard_normal(shape).astype(np.float32)
    values.reshape(-1)[:6] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
    grad = rng.standard_normal(shape).astype(np.float32)
    for inplace, team, dy_layout in itertools.product((False, True), (1, 2), (layout, "C" if layout != "C" else "F")):
        out = []
        for impl in (kernels.Reference(), compiled):
            layer = type("R", (ReLU,), {"kernels": impl})(inplace=inplace)
            layer.team = Team(team)
            y = layer.forward(_array(shape, layout, values), True).copy()
            dx = layer.backward(_array(shape, dy_layout, grad)).copy()
            out.append((y, dx))
        (y_ref, dx_ref), (y_ours, dx_ours) = out
        assert np.array_equal(y_ref, y_ours, equal_nan=True) and np.array_equal(dx_ref, dx_ours, equal_nan=True)
        assert np.array_equal(np.signbit(y_ref), np.signbit(y_ours)), (inplace, team, dy_layout)


@pytest.mark.parametrize("order", ["C", "F"])
def test_compiled_bias_add_gives_the_reference_bits(compiled, order):
    rng = np.random.default_rng(8)
    y0 = np.asarray(rng.standard_normal((257, 130)).astype(np.float32), order=order)
    b = rng.standard_normal(130).astype(np.float32)
    ref, ours = y0.copy(order="K"), y0.copy(order="K")
    kernels.Reference().add_bias(ref, b)
    compiled.add_bias(ours, b)
    assert np.array_equal(ref, ours)
    cols = y0.copy(order="K")
    compiled.add_bias(cols[:, 30:90], b[30:90])  # a worker's block of columns
    assert np.array_equal(cols[:, 30:90], ref[:, 30:90]) and np.array_equal(cols[:, :30], y0[:, :30])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ho, wo", [(6, 8), (7, 5), (1, 1)])
def test_compiled_winograd_transforms_give_the_reference_bits(compiled, dtype, ho, wo):
    """Input, output (with and without bias, odd sizes cropped) and output-gradient transforms."""
    from ddtrain.engine import winograd
    rng = np.random.default_rng(3)
    n, c, co = 3, 5, 4
    th, tw = winograd.tiles(ho, wo)
    layer = conv.Conv2d(co, 3, 1, 1)
    src = rng.standard_normal((n, *winograd.padded_size(ho, wo), c)).astype(dtype)
    m = rng.standard_normal((16, n * th * tw, co)).astype(dtype)
    dy = rng.standard_normal((n, ho, wo, co)).astype(dtype)
    bias = rng.standard_normal(co).astype(dtype)
    out = {}
    for impl in (kernels.Reference(), compiled):
        v = np.full((16, n * th * tw, c), np.nan, dtype)
        impl.winograd_input(layer, 0, src, th, tw, v)
        y, yb = np.full((n, ho, wo, co), np.nan, dtype), np.full((n, ho, wo, co), np.nan, dtype)
        impl.winograd_output(layer, 0, m, th, tw, None, y)
        impl.winograd_output(layer, 0, m, th, tw, bias, yb)
        dm = np.full((16, n * th * tw, co), np.nan, dtype)
        impl.winograd_output_grad(layer, 0, dy, th, tw, dm)
        out[impl.name] = (v, y, yb, dm)
    for a, b in zip(out["numpy"], out["numba"]):
        assert not np.isnan(a).any()
        np.testing.assert_array_equal(a, b)
    # and they are the transforms: B^T d B of the first tile, A^T M A of the first tile
    v, y, _, dm = out["numba"]
    bt, at = winograd.B_T, winograd.A_T
    np.testing.assert_allclose(v[:, 0, 0].reshape(4, 4), bt @ src[0, :4, :4, 0] @ bt.T, rtol=1e-5, atol=1e-5)
    full = at @ m[:, 0, 0].reshape(4, 4) @ at.T
    np.testing.assert_allclose(y[0, :2, :2, 0], full[:min(2, ho), :min(2, wo)], rtol=1e-5, atol=1e-5)
    g = np.zeros((2, 2))
    g[:min(2, ho), :min(2, wo)] = dy[0, :2, :2, 0]
    np.testing.assert_allclose(dm[:, 0, 0].reshape(4, 4), at.T @ g @ at, rtol=1e-5, atol=1e-5)
