"""Sequential and build_model: layout, views, backward contract, data-parallel slicing, config errors."""

import tracemalloc

import numpy as np
import pytest

from ddtrain.engine.context import BatchContext
from ddtrain.engine.losses import make_loss
from ddtrain.engine.model import build_model
from ddtrain.engine.optim import make_optimizer
from ddtrain.errors import ConfigError

MLP = [{"type": "flatten"}, {"type": "linear", "out": 512}, {"type": "relu"},
       {"type": "linear", "out": 512}, {"type": "relu"}, {"type": "linear", "out": 10}]
SMALL = [{"type": "flatten"}, {"type": "linear", "out": 16}, {"type": "relu"}, {"type": "dropout", "p": 0.25},
         {"type": "linear", "out": 8}, {"type": "tanh"}, {"type": "linear", "out": 5, "bias": False}]


def batch(n, in_shape=(4, 3), classes=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *in_shape)).astype(dtype), rng.integers(0, classes, n)


def test_mlp_layout_matches_pytorch_names_and_sizes():
    model = build_model(MLP, (28, 28))
    assert model.params.names == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    assert [model.params.params[n].shape for n in model.params.names] == [
        (512, 784), (512,), (512, 512), (512,), (10, 512), (10,)]
    assert model.params.size == 669_706 and model.params.data.dtype == np.float32
    assert model.out_shape == (10,)
    text = model.summary()
    assert "Linear(784 -> 512)" in text and "669,706" in text


def test_layer_views_share_the_flat_buffers_before_and_after_a_step():
    model = build_model(SMALL, (4, 3), dtype=np.float32)
    x, y = batch(6, dtype=np.float32)
    loss, opt = make_loss("cross_entropy"), make_optimizer("sgd", model.params, momentum=0.9)
    for step in range(2):
        model.set_batch_context(BatchContext(0, step, 0, 6))
        loss.forward(model.forward(x, train=True), y)
        model.backward(loss.backward(1 / 6))
        opt.step(0.1)
        for layer in (model.layers[1], model.layers[4], model.layers[6]):
            assert np.shares_memory(layer.W, model.params.data)
            assert np.shares_memory(layer.dW, model.params.grad)
        assert np.shares_memory(model.layers[1].b, model.params.data)
        assert model.layers[6].b is None
    assert np.any(model.params.grad != 0)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_model(MLP, (28, 28), seed=s) for s in (1, 1, 2))
    assert a.params.fingerprint() == b.params.fingerprint() != c.params.fingerprint()


def run_backward(model, x, y, scale, on_grads_ready=None, step=0, offset=0, global_batch=None):
    loss = make_loss("cross_entropy")
    model.set_batch_context(BatchContext(3, step, offset, global_batch or len(x)))
    loss.forward(model.forward(x, train=True), y)
    return model.backward(loss.backward(scale), on_grads_ready)


def test_backward_overwrites_gradients_and_skips_the_input_gradient():
    model = build_model(SMALL, (4, 3), dtype=np.float64)
    x, y = batch(6)
    assert run_backward(model, x, y, 1 / 6) is None  # no dx for the first layers by default
    assert not model.layers[1].needs_input_grad and model.layers[4].needs_input_grad
    first = model.params.grad.copy()
    run_backward(model, x, y, 1 / 6)
    np.testing.assert_array_equal(model.params.grad, first)  # written, not accumulated


def test_on_grads_ready_reports_finished_suffixes_last_layer_first():
    model = build_model(SMALL, (4, 3), dtype=np.float64)
    x, y = batch(6)
    seen = []
    run_backward(model, x, y, 1 / 6, lambda offset: seen.append((offset, model.params.grad[offset:].copy())))
    offsets = [o for o, _ in seen]
    starts = {s.name: s.start for s in model.params.slots}
    assert offsets == [starts["6.weight"], starts["4.weight"], starts["1.weight"]] and offsets[-1] == 0
    for offset, suffix in seen:
        np.testing.assert_array_equal(suffix, model.params.grad[offset:])


@pytest.mark.parametrize("splits", [[4, 4], [3, 2, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
def test_rank_slices_sum_to_the_global_batch_gradient(splits):
    """Data parallelism: each rank's gradient (scale 1/global) summed over ranks equals the one-process
    gradient of the whole global batch, dropout included (its masks follow the global sample index)."""
    global_batch = sum(splits)
    x, y = batch(global_batch, seed=5)
    whole = build_model(SMALL, (4, 3), seed=9, dtype=np.float64)
    run_backward(whole, x, y, 1 / global_batch, step=2)
    total, offset = np.zeros_like(whole.params.grad), 0
    for n in splits:
        rank = build_model(SMALL, (4, 3), seed=9, dtype=np.float64)
        run_backward(rank, x[offset:offset + n], y[offset:offset + n], 1 / global_batch,
                     step=2, offset=offset, global_batch=global_batch)
        total += rank.params.grad
        offset += n
    np.testing.assert_allclose(total, whole.params.grad, rtol=1e-12, atol=1e-15)


def test_eval_forward_ignores_dropout():
    model = build_model(SMALL, (4, 3), dtype=np.float64)
    x, _ = batch(3)
    no_dropout = build_model([s for s in SMALL if s["type"] != "dropout"], (4, 3), dtype=np.float64)
    no_dropout.params.data[...] = model.params.data
    np.testing.assert_array_equal(model.forward(x, train=False), no_dropout.forward(x, train=False))


def test_steady_state_training_step_does_not_allocate_big_arrays():
    model = build_model(MLP, (28, 28))
    loss, opt = make_loss("cross_entropy"), make_optimizer("sgd", model.params, momentum=0.9)
    x, y = batch(64, (28, 28), classes=10, dtype=np.float32)

    def step():
        loss.forward(model.forward(x, train=True), y)
        model.backward(loss.backward(1 / 64))
        opt.step(0.01)

    step()
    step()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # One (64, 512) float32 activation is 131 kB; numpy's own ufunc buffers (8192 elements,
    # e.g. for the broadcast bias add) are 32 kB and freed at once, so 64 kB separates the two.
    assert peak - base < 64_000, "a step allocated an activation-sized temporary: a missing out="


def test_a_tanh_network_learns_with_mse():
    """The single-layer tanh network's recipe: tanh units regressed onto one-hot targets; the loss must drop."""
    rng = np.random.default_rng(0)
    centers = 3 * rng.standard_normal((3, 6))
    labels = rng.integers(0, 3, 60)
    x = centers[labels] + 0.3 * rng.standard_normal((60, 6))
    model = build_model([{"type": "linear", "out": 3, "bias": False}, {"type": "tanh"}], (6,), dtype=np.float64)
    loss, opt = make_loss("mse"), make_optimizer("sgd", model.params, momentum=0.9)
    losses = []
    for _ in range(60):
        losses.append(float(loss.forward(model.forward(x, train=True), labels)) / 60)
        model.backward(loss.backward(1 / 60))
        opt.step(0.5)
    assert losses[-1] < 0.3 * losses[0]
    assert int(loss.correct(model.forward(x, train=False), labels)) >= 57


def test_wrong_input_dtype_or_shape_says_what_to_do():
    model = build_model(MLP, (28, 28))
    with pytest.raises(TypeError, match=r"astype\(float32\)"):
        model.forward(np.zeros((2, 28, 28)), train=False)
    with pytest.raises(ValueError, match=r"expects \(28, 28\)"):
        model.forward(np.zeros((2, 784), np.float32), train=False)


@pytest.mark.parametrize("specs, message", [
    ([{"type": "flatten"}, {"type": "reul"}],
     r"layer 1: unknown layer type 'reul' \(did you mean 'relu'\?\); valid: linear, relu, tanh, sigmoid, "
     r"flatten, dropout"),
    ([{"type": "flatten"}, {"type": "linear", "outs": 10}],
     r"layer 1 \(linear\): unknown key 'outs' \(did you mean 'out'\?\); valid: out, bias"),
    ([{"type": "flatten"}, {"type": "linear"}], r"layer 1 \(linear\): missing key 'out'"),
    ([{"type": "flatten"}, {"type": "linear", "out": 0}], r"layer 1 \(linear\): 'out' must be a positive integer"),
    ([{"type": "dropout", "p": 1.5}], r"layer 0 \(dropout\): 'p' must be a number in \[0, 1\)"),
    ([{"type": "linear", "out": 10}], r"layer 0 \(linear\): .*put a flatten layer before it"),
    ([{"out": 10}], r"layer 0: expected a mapping with a 'type' key"),
    ([], r"non-empty list"),
])
def test_bad_layer_specs_are_one_line_config_errors(specs, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_model(specs, (28, 28))
    assert "\n" not in str(info.value)


def test_unknown_init_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match=r"did you mean 'xavier'"):
        build_model(MLP, (28, 28), init="xavir")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name, opt_name", [("cross_entropy", "sgd"), ("mse", "adam"), ("hinge", "adamw")])
def test_gpu_step_matches_cpu_step(loss_name, opt_name):
    """The same code on CuPy: same initial weights, dropout masks, gradients and update as on numpy."""
    from ddtrain.backend import CPU, resolve_backend

    gpu = resolve_backend("auto")
    if not gpu.is_gpu:
        pytest.skip("needs CuPy and a CUDA device")
    x, y = batch(6, dtype=np.float32)
    results = []
    for backend in (CPU, gpu):
        model = build_model(SMALL, (4, 3), backend, seed=4)
        loss, opt = make_loss(loss_name, backend), make_optimizer(opt_name, model.params)
        model.set_batch_context(BatchContext(1, 0, 0, 6))
        value = loss.forward(model.forward(backend.from_host(x), train=True), backend.from_host(y))
        model.backward(loss.backward(1 / 6))
        opt.step(0.1)
        results.append((float(value), backend.to_host(model.params.grad), model.params.state_dict()))
    (cpu_loss, cpu_grad, cpu_params), (gpu_loss, gpu_grad, gpu_params) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    np.testing.assert_allclose(gpu_grad, cpu_grad, rtol=1e-4, atol=1e-6)
    for name in cpu_params:
        np.testing.assert_allclose(gpu_params[name], cpu_params[name], rtol=1e-4, atol=1e-6)
