"""Convolution, pooling and batch norm: gradient checks, PyTorch parity, layout, allocation-free steps."""

import os
import threading
import tracemalloc

import numpy as np
import pytest

from ddtrain.engine.context import BatchContext, single_batch
from ddtrain.engine.conv import AvgPool2d, Conv2d, MaxPool2d, is_channels_last
from ddtrain.engine.gradcheck import check_layer, check_model
from ddtrain.engine.layers import Dropout, Flatten
from ddtrain.engine.losses import make_loss
from ddtrain.engine.model import Sequential, build_model
from ddtrain.engine.norm import BatchNorm1d, BatchNorm2d
from ddtrain.engine.optim import make_optimizer
from ddtrain.engine.team import Team
from ddtrain.errors import ConfigError
from tests.helpers import require


def chunked(layer):
    """The layer with one sample per im2col chunk (the chunk loop's edges get exercised)."""
    layer.CHUNK_BYTES, layer.MIN_ROWS = 1, 1
    return layer


def winograd_chunked(layer):
    """The layer with one sample per Winograd chunk."""
    layer.WINOGRAD_CHUNK_BYTES = 1
    return layer


GRAD_CASES = [
    ("conv-k3-s1-p1", lambda: Conv2d(4, 3, 1, 1), (2, 5, 6)),
    ("conv-k3-s2-p0", lambda: Conv2d(3, 3, 2, 0), (2, 7, 6)),
    ("conv-k1-s1-p0", lambda: Conv2d(3, 1, 1, 0), (2, 4, 3)),
    ("conv-k1-p1-overpadded", lambda: Conv2d(3, 1, 1, 1), (2, 4, 4)),
    ("conv-k5-s2-p2", lambda: Conv2d(2, 5, 2, 2), (3, 7, 9)),
    ("conv-k5-s1-p2-no-bias", lambda: Conv2d(2, 5, 1, 2, bias=False), (2, 6, 5)),
    ("conv-one-channel-p2", lambda: Conv2d(3, 3, 1, 2), (1, 6, 5)),
    ("conv-one-channel-s2", lambda: Conv2d(3, 3, 2, 1), (1, 7, 5)),
    ("conv-chunked", lambda: chunked(Conv2d(3, 3, 1, 1)), (2, 5, 6)),
    ("winograd-p1", lambda: Conv2d(4, 3, 1, 1, algorithm="winograd"), (3, 5, 6)),
    ("winograd-p0-odd-output", lambda: Conv2d(3, 3, 1, 0, algorithm="winograd"), (2, 7, 6)),
    ("winograd-p2-no-bias", lambda: Conv2d(2, 3, 1, 2, bias=False, algorithm="winograd"), (3, 5, 7)),
    ("winograd-one-channel", lambda: Conv2d(3, 3, 1, 1, algorithm="winograd"), (1, 6, 5)),
    ("winograd-chunked", lambda: winograd_chunked(Conv2d(3, 3, 1, 1, algorithm="winograd")), (2, 5, 6)),
    ("maxpool-2", lambda: MaxPool2d(2), (2, 6, 4)),
    ("maxpool-2-odd", lambda: MaxPool2d(2), (2, 7, 5)),
    ("maxpool-3-s2-p1", lambda: MaxPool2d(3, 2, 1), (2, 7, 6)),
    ("maxpool-3-s1-overlap", lambda: MaxPool2d(3, 1, 1), (2, 5, 5)),
    ("avgpool-2-odd", lambda: AvgPool2d(2), (2, 5, 7)),
    ("avgpool-3-s2-p1", lambda: AvgPool2d(3, 2, 1), (2, 7, 6)),
    ("batchnorm2d", BatchNorm2d, (3, 4, 5)),
    ("batchnorm1d", BatchNorm1d, (4,)),
    ("batchnorm1d-length", BatchNorm1d, (3, 5)),
]


# Batch 1 and 3 of every case, but BatchNorm1d on (C,) features, whose batch of 1 has a single
# value per channel (an error in training, as in PyTorch).
GRAD_RUNS = [pytest.param(make, shape, batch, id=f"{name}-batch{batch}") for name, make, shape in GRAD_CASES
             for batch in (1, 3) if not (name == "batchnorm1d" and batch == 1)]


@pytest.mark.parametrize("make, in_shape, batch", GRAD_RUNS)
def test_gradients_match_central_differences(make, in_shape, batch):
    rows = check_layer(make(), in_shape, batch=batch, seed=1)
    assert rows[-1].param == "input"
    for row in rows:
        assert row.max_rel_error < 1e-6, row


def test_batchnorm_in_eval_mode_has_the_affine_gradient():
    """Eval mode normalises with the running statistics: dx = dy * weight / sqrt(var + eps)."""
    model = Sequential([BatchNorm2d()], (3, 2, 2), dtype=np.float64, input_grad=True)
    bn = model.layers[0]
    bn.buffers["running_var"][...] = [0.5, 2.0, 4.0]
    model.params.data[...] = np.arange(1.0, 7.0)
    dy = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 2))
    model.forward(x, train=False)
    dx = model.backward(dy)
    scale = np.array([1, 2, 3]) / np.sqrt(np.array([0.5, 2.0, 4.0]) + 1e-5)
    np.testing.assert_allclose(dx, dy * scale[:, None, None], rtol=1e-12)


# A bias right before a BatchNorm has gradient 0 (the mean removes it): those convolutions have none.
CNN = [{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1, "bias": False}, {"type": "batchnorm2d"},
       {"type": "relu"},
       {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "out": 6, "kernel": 3, "stride": 2},
       {"type": "relu"}, {"type": "avgpool2d", "kernel": 2, "stride": 1}, {"type": "flatten"},
       {"type": "linear", "out": 8, "bias": False}, {"type": "batchnorm1d"}, {"type": "relu"},
       {"type": "dropout", "p": 0.3},
       {"type": "linear", "out": 5}]


def test_a_whole_cnn_has_correct_gradients():
    for row in check_model(CNN, (2, 11, 10), batch=3, max_checks=12):
        assert row.max_rel_error < 1e-6, row


def test_relu_before_maxpool_runs_after_it_with_bitwise_the_same_results():
    """The model runs a ReLU that precedes a MaxPool2d on the pooled output: the logits, the
    input gradient and every weight gradient are bitwise those of the layers' own order, also
    with ties and negative window maxima (values on a coarse grid, half of them negative)."""
    specs = [{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
             {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "out": 6, "kernel": 3},
             {"type": "batchnorm2d"}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 3, "stride": 2, "padding": 1},
             {"type": "flatten"}, {"type": "linear", "out": 5}]
    rng = np.random.default_rng(4)
    x = (np.round(rng.standard_normal((6, 1, 12, 11)) * 2) / 2).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    results = []
    for swapped in (True, False):
        model = build_model(specs, (1, 12, 11), seed=3)
        model.input_grad = True
        if swapped:
            assert model.run_order == [0, 2, 1, 3, 4, 6, 5, 7, 8]
        else:
            model.run_order = list(range(len(specs)))
            for i in (1, 5):
                model.layers[i].inplace = False
        loss = make_loss("cross_entropy")
        model.set_batch_context(single_batch(0, 0, 6))
        logits = model.forward(x, train=True).copy()
        loss.forward(logits, labels)
        dx = model.backward(loss.backward(1 / 6)).copy()
        results.append((logits, dx, model.params.grad.copy()))
    for ours, theirs in zip(*results):
        np.testing.assert_array_equal(ours, theirs)


# -- PyTorch parity -------------------------------------------------------------------------

def require_torch():
    torch = require("torch", "torch is not installed (pip install torch: the parity tests compare with it)")
    torch.set_num_threads(1)
    return torch


def close(ours, theirs, rel=1e-5):
    """Norm-relative agreement: |ours - theirs| <= rel * |theirs| (float32 rounding differs by kernel)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    err = np.linalg.norm(ours - theirs)
    assert err <= rel * max(np.linalg.norm(theirs), 1e-30), f"relative error {err / np.linalg.norm(theirs):.2e}"


def torch_layer(torch, layer, in_shape):
    nn = torch.nn
    c = in_shape[0]
    if isinstance(layer, Conv2d):
        return nn.Conv2d(c, layer.out_channels, layer.k, layer.s, layer.p, bias=layer.has_bias)
    if isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.k, layer.s, layer.p)
    if isinstance(layer, AvgPool2d):
        return nn.AvgPool2d(layer.k, layer.s, layer.p)
    if isinstance(layer, BatchNorm2d):
        return nn.BatchNorm2d(c, layer.eps, layer.momentum)
    if isinstance(layer, BatchNorm1d):
        return nn.BatchNorm1d(c, layer.eps, layer.momentum)
    raise AssertionError(layer)


PARITY_CASES = [
    ("conv-k3-s1-p1", lambda: Conv2d(8, 3, 1, 1), (3, 9, 7)),
    ("conv-k3-s2-p1", lambda: Conv2d(5, 3, 2, 1), (4, 9, 8)),
    ("conv-k5-s1-p2", lambda: Conv2d(6, 5, 1, 2, bias=False), (3, 8, 10)),
    ("conv-k1-s2-p0", lambda: Conv2d(4, 1, 2, 0), (6, 7, 7)),
    ("conv-one-channel", lambda: Conv2d(16, 3, 1, 1), (1, 12, 12)),
    ("winograd-k3-p1", lambda: Conv2d(8, 3, 1, 1, algorithm="winograd"), (3, 9, 7)),
    ("winograd-p0-odd", lambda: Conv2d(5, 3, 1, 0, algorithm="winograd"), (4, 9, 8)),
    ("winograd-p2-no-bias", lambda: Conv2d(6, 3, 1, 2, bias=False, algorithm="winograd"), (3, 8, 10)),
    ("winograd-speed-cnn-conv2", lambda: Conv2d(64, 3, 1, 1, algorithm="winograd"), (32, 14, 14)),
    ("maxpool-2-odd", lambda: MaxPool2d(2), (5, 9, 7)),
    ("maxpool-3-s2-p1", lambda: MaxPool2d(3, 2, 1), (4, 9, 8)),
    ("avgpool-3-s2-p1", lambda: AvgPool2d(3, 2, 1), (4, 9, 8)),
    ("batchnorm2d", BatchNorm2d, (6, 5, 4)),
    ("batchnorm1d", BatchNorm1d, (7,)),
    ("batchnorm1d-length", BatchNorm1d, (5, 6)),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make, in_shape", [c[1:] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_forward_and_gradients_match_torch(make, in_shape, train):
    """float32, same weights and inputs: output, input gradient and weight gradients as torch's;
    BatchNorm's running statistics too, over 3 steps (eval: after 3 training steps)."""
    torch = require_torch()
    rng = np.random.default_rng(0)
    model = Sequential([make()], in_shape, dtype=np.float32, input_grad=True, seed=3)
    layer = model.layers[0]
    ref = torch_layer(torch, layer, in_shape)
    if model.params.size:
        params = {k.split(".", 1)[1]: v for k, v in model.params.state_dict().items()}
        if isinstance(layer, (BatchNorm1d, BatchNorm2d)):  # not the trivial 1 and 0
            params = {k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) for k, v in params.items()}
            model.load_state_dict({**model.state_dict(), **{f"0.{k}": v for k, v in params.items()}})
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=False)
    batch = 6
    for step in range(3 if train else 4):
        training = train or step < 3  # eval: three training steps first, then the eval forward
        x = (1.5 * rng.standard_normal((batch, *in_shape)) + 0.7).astype(np.float32)
        dy = rng.standard_normal((batch, *layer.output_shape(in_shape))).astype(np.float32)
        model.set_batch_context(single_batch(0, step, batch))
        y = np.array(model.forward(x, train=training))
        dx = np.array(model.backward(dy))
        ref.train(training)
        tx = torch.from_numpy(x).requires_grad_(True)
        for p in ref.parameters():
            p.grad = None
        ty = ref(tx)
        ty.backward(torch.from_numpy(dy))
        if not training or step == 0 or isinstance(layer, (BatchNorm1d, BatchNorm2d)):
            close(y, ty.detach().numpy())
            close(dx, tx.grad.numpy())
            for name, p in ref.named_parameters():
                close(model.params.grads[f"0.{name}"], p.grad.numpy())
            for name, b in ref.named_buffers():
                if name == "num_batches_tracked":
                    assert int(model.buffers["0.num_batches_tracked"]) == int(b) == min(step + 1, 3)
                else:
                    close(model.buffers[f"0.{name}"], b.numpy())


def test_maxpool_ties_go_to_the_first_position_like_torch():
    """After a ReLU whole windows are 0: the gradient goes to each window's first position."""
    torch = require_torch()
    x = np.zeros((2, 3, 4, 6), np.float32)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 2.0  # a tie between two non-zero entries too
    dy = np.random.default_rng(0).standard_normal((2, 3, 2, 3)).astype(np.float32)
    model = Sequential([MaxPool2d(2)], (3, 4, 6), dtype=np.float32, input_grad=True)
    model.forward(x, True)
    dx = model.backward(dy)
    tx = torch.from_numpy(x).requires_grad_(True)
    torch.nn.functional.max_pool2d(tx, 2).backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(dx, tx.grad.numpy())


CNN_TORCH = [{"type": "conv2d", "out": 8, "kernel": 3, "padding": 1, "bias": False}, {"type": "batchnorm2d"},
             {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
             {"type": "conv2d", "out": 16, "kernel": 3, "padding": 1, "bias": False},
             {"type": "batchnorm2d"}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"},
             {"type": "linear", "out": 32}, {"type": "relu"}, {"type": "dropout", "p": 0.5},
             {"type": "linear", "out": 10}]


def test_cnn_state_dict_loads_strictly_into_torch_and_gives_the_same_logits_and_gradients():
    torch = require_torch()
    from ddtrain.benchmarks.cnn import torch_model
    model = build_model(CNN_TORCH, (1, 28, 28), seed=5)
    ref = torch_model(CNN_TORCH, (1, 28, 28))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    ref.eval()
    close(model.forward(x, train=False), ref(torch.from_numpy(x)).detach().numpy())
    # Training: dropout off on both sides (its masks differ by design), batch statistics on.
    model.layers[11].p = 0.0
    ref.train()
    ref[11].p = 0.0
    loss = make_loss("cross_entropy")
    model.set_batch_context(single_batch(0, 0, 16))
    loss.forward(model.forward(x, train=True), labels)
    model.backward(loss.backward(1 / 16))
    out = torch.nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(labels))
    out.backward()
    for name, p in ref.named_parameters():
        close(model.params.grads[name], p.grad.numpy(), rel=1e-4)
    for name, b in ref.named_buffers():
        close(model.state_dict()[name], b.numpy())


# -- layout, batch statistics over ranks, allocation, config -----------------------------------

def test_conv_output_is_channels_last_and_flatten_keeps_torch_feature_order():
    model = build_model([{"type": "conv2d", "out": 3, "kernel": 1}, {"type": "flatten"}], (2, 2, 3),
                        dtype=np.float64)
    conv = model.layers[0]
    conv.W[...] = np.eye(3, 2)[:, :, None, None]  # output channels: x0, x1, 0
    conv.b[...] = 0
    x = np.arange(12.0).reshape(1, 2, 2, 3)
    y = conv.forward(x, True)
    assert is_channels_last(y) and not y.flags.c_contiguous
    flat = model.layers[1].forward(y, True)
    np.testing.assert_array_equal(flat, np.concatenate([x.ravel(), np.zeros(6)])[None])  # (C, H, W) order


def test_dropout_on_images_is_the_same_for_either_layout():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 6)) + 5.0
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    outs = []
    for a in (x, nhwc):
        drop = Sequential([Dropout(0.4)], (3, 5, 6), dtype=np.float64, input_grad=True).layers[0]
        drop.set_batch_context(BatchContext(1, 2, 0, 4))
        y = drop.forward(a, True)
        outs.append((np.array(y), np.array(drop.backward(np.ones_like(a))), is_channels_last(y)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert outs[1][2]  # the mask multiply kept the channels-last layout
    assert 0.3 < (outs[0][0] == 0).mean() < 0.5


class ThreadRanks:
    """batch_sum across threads that play ranks: every rank's local sums added, in rank order."""

    def __init__(self, ranks):
        self.barrier = threading.Barrier(ranks)
        self.slots = [None] * ranks
        self.globals = []

    def for_rank(self, rank):
        def batch_sum(key, local, on_global=None):
            self.slots[rank] = (key, np.array(local))
            self.barrier.wait()
            keys = {k for k, _ in self.slots}
            assert keys == {key}, f"ranks called batch_sum in different orders: {keys}"
            total = sum(v for _, v in self.slots)
            self.barrier.wait()
            if on_global is not None:
                on_global(total)
            return total
        return batch_sum


@pytest.mark.parametrize("splits", [[6, 2], [3, 0, 5]])
def test_batchnorm_uses_global_batch_statistics_for_any_split(splits):
    """Ranks holding parts of the batch get the gradients (summed) and running statistics of the
    one-process run, an empty part included: the statistics are those of the global batch."""
    specs = [{"type": "conv2d", "out": 4, "kernel": 3}, {"type": "batchnorm2d"}, {"type": "relu"},
             {"type": "flatten"}, {"type": "linear", "out": 3}, {"type": "batchnorm1d"}]
    total_n = sum(splits)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((total_n, 2, 6, 5))
    labels = rng.integers(0, 3, total_n)

    def run(model, xs, ys, ctx):
        loss = make_loss("cross_entropy")
        model.set_batch_context(ctx)
        loss.forward(model.forward(xs, train=True), ys)
        model.backward(loss.backward(1 / total_n))

    whole = build_model(specs, (2, 6, 5), dtype=np.float64, seed=1)
    run(whole, x, labels, single_batch(0, 0, total_n))
    ranks = ThreadRanks(len(splits))
    models = [build_model(specs, (2, 6, 5), dtype=np.float64, seed=1) for _ in splits]
    offsets = np.cumsum([0] + splits)
    threads = [threading.Thread(target=run, args=(
        m, x[offsets[r]:offsets[r + 1]], labels[offsets[r]:offsets[r + 1]],
        BatchContext(0, 0, int(offsets[r]), total_n, ranks.for_rank(r)))) for r, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    np.testing.assert_allclose(sum(m.params.grad for m in models), whole.params.grad, rtol=1e-10, atol=1e-12)
    for m in models:
        for name, value in whole.buffers_state_dict().items():
            np.testing.assert_allclose(m.buffers_state_dict()[name], value, rtol=1e-6)


def test_batchnorm_needs_a_batch_context_and_more_than_one_value():
    bn = Sequential([BatchNorm1d()], (3,), dtype=np.float64).layers[0]
    with pytest.raises(RuntimeError, match="set_batch_context"):
        bn.forward(np.ones((4, 3)), train=True)
    bn.set_batch_context(single_batch(0, 0, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.forward(np.ones((1, 3)), train=True)


BIG = [{"type": "conv2d", "out": 8, "kernel": 3, "padding": 1}, {"type": "batchnorm2d"}, {"type": "relu"},
       {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "out": 16, "kernel": 3, "padding": 1},
       {"type": "relu"}, {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"},
       {"type": "linear", "out": 32}, {"type": "relu"}, {"type": "dropout", "p": 0.5}, {"type": "linear", "out": 10}]


@pytest.mark.parametrize("algorithm", ["auto", "winograd"])
def test_steady_state_cnn_step_allocates_no_new_arrays(algorithm):
    specs = [{**s, "algorithm": algorithm} if s["type"] == "conv2d" else s for s in BIG]
    model = build_model(specs, (1, 28, 28))
    loss, opt = make_loss("cross_entropy"), make_optimizer("sgd", model.params, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)

    def step(t):
        model.set_batch_context(single_batch(0, t, 64))
        loss.forward(model.forward(x, train=True), y)
        model.backward(loss.backward(1 / 64))
        opt.step(0.01)

    step(0)
    pools = [len(layer._pool) for layer in model.layers]
    step(1)
    assert [len(layer._pool) for layer in model.layers] == pools
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for t in range(2, 4):
            step(t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The smallest activation here, (64, 16, 7, 7) float32, is 200 kB; numpy's own ufunc buffers
    # (8192 elements per operand, up to three operands on strided views) are freed at once.
    assert peak - base < 128_000, "a step allocated an activation-sized temporary: a missing out="


def test_conv_layer_specs_build_and_bad_ones_say_why():
    model = build_model(BIG, (1, 28, 28))
    assert model.shapes[:4] == [(8, 28, 28), (8, 28, 28), (8, 28, 28), (8, 14, 14)]
    assert model.params.names[:4] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert list(model.buffers) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    tracked = model.buffers["1.num_batches_tracked"]
    assert tracked.dtype == np.int64 and tracked.shape == ()
    with pytest.raises(ConfigError, match=r"layer 0 \(conv2d\): missing key 'kernel'"):
        build_model([{"type": "conv2d", "out": 4}], (1, 28, 28))
    with pytest.raises(ConfigError, match=r"layer 0 \(conv2d\): 'padding' must be an integer >= 0"):
        build_model([{"type": "conv2d", "out": 4, "kernel": 3, "padding": -1}], (1, 28, 28))
    with pytest.raises(ConfigError, match=r"layer 0 \(conv2d\): .*\(C, H, W\)"):
        build_model([{"type": "conv2d", "out": 4, "kernel": 3}], (28, 28))
    with pytest.raises(ConfigError, match=r"layer 0 \(maxpool2d\): padding 2 must be at most half"):
        build_model([{"type": "maxpool2d", "kernel": 2, "padding": 2}], (1, 28, 28))
    with pytest.raises(ConfigError, match=r"layer 0 \(conv2d\): kernel 5 .* does not fit input 3x3"):
        build_model([{"type": "conv2d", "out": 4, "kernel": 5}], (1, 3, 3))
    with pytest.raises(ConfigError, match=r"'momentum' must be a number in \[0, 1\]"):
        build_model([{"type": "batchnorm2d", "momentum": 2}], (1, 28, 28))


def test_summary_counts_forward_flops_per_sample():
    model = build_model([{"type": "conv2d", "out": 32, "kernel": 3, "padding": 1}, {"type": "relu"},
                         {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "out": 10}],
                        (1, 28, 28))
    conv, linear = 2 * 32 * 28 * 28 * 9, 2 * 32 * 14 * 14 * 10
    flops = model.flops()
    assert flops[0] == conv and flops[4] == linear and flops[1] == 0
    text = model.summary()
    assert "MFLOPs" in text and f"{conv / 1e6:.3f}" in text and "Conv2d(1 -> 32, k=3, s=1, p=1)" in text


def test_conv_init_schemes_use_the_kernel_fan_in():
    conv = build_model([{"type": "conv2d", "out": 64, "kernel": 3}], (32, 8, 8), seed=1).layers[0]
    bound = 1 / np.sqrt(32 * 9)
    assert np.abs(conv.W).max() <= bound and np.abs(conv.W).max() > 0.99 * bound
    assert np.abs(conv.b).max() <= bound and conv.b.std() > 0.3 * bound
    he = build_model([{"type": "conv2d", "out": 64, "kernel": 3}], (32, 8, 8), init="he", seed=1).layers[0]
    assert he.W.std() == pytest.approx(np.sqrt(2 / (32 * 9)), rel=0.03) and not he.b.any()


@pytest.mark.parametrize("name", ["cnn", "cnn-small"])
def test_cnn_configs_build_and_summary_prints_their_flops(name):
    from click.testing import CliRunner

    from ddtrain.cli import main
    from ddtrain.config import load_config
    cfg = load_config(name)
    model = build_model(cfg.model.layers, (1, 28, 28))
    assert model.out_shape == (10,) and any(isinstance(layer, BatchNorm2d) for layer in model.layers)
    result = CliRunner().invoke(main, ["summary", "--config", name])
    assert result.exit_code == 0, result.output
    assert "Conv2d(1 -> " in result.output
    assert f"{sum(model.flops()) / 1e6:.2f} MFLOPs per sample forward" in result.output


@pytest.mark.parametrize("threads", [1, 2])
def test_a_model_with_chunk_loops_takes_the_threads_from_blas_and_an_mlp_gives_them_back(threads):
    """A fresh process with OPENBLAS_NUM_THREADS set: a CNN gets a team of that many workers and
    BLAS one thread; an MLP built after it gets no team and BLAS its threads back. The chunks
    (conv3's GEMM rows at batch 128: 49 positions, 576 columns) do not depend on the team."""
    import os
    import subprocess
    import sys
    code = ("from ddtrain.engine import blas; from ddtrain.engine.model import build_model; "
            "from ddtrain.config import load_config; "
            "cnn = build_model(load_config('cnn-small').model.layers, (1, 28, 28)); t = blas.threads(); "
            "mlp = build_model(load_config('mlp').model.layers, (1, 28, 28)); "
            "c = cnn.layers[0]._chunks(128, 49, 576, 4); print(cnn.team.size, t, mlp.team.size, blas.threads(), len(c), c[0])")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{threads} 1 1 {threads} 7 (0, 20)"


# -- Winograd F(2x2, 3x3) ----------------------------------------------------------------------

def _conv_run(algorithm, in_shape, out, padding, batch=7, team=1, seed=0):
    model = Sequential([Conv2d(out, 3, 1, padding, algorithm=algorithm)], in_shape, dtype=np.float32,
                       input_grad=True, seed=4)
    model.layers[0].team = Team(team)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
    y = np.array(model.forward(x, train=True))
    dx = np.array(model.backward(rng.standard_normal(y.shape).astype(np.float32)))
    return model.layers[0], y, dx, model.params.grad.copy()


@pytest.mark.parametrize("in_shape, out, padding", [((32, 14, 14), 64, 1), ((5, 9, 8), 7, 0), ((6, 7, 10), 4, 2)])
def test_winograd_and_im2col_compute_the_same_convolution(in_shape, out, padding):
    """Two algorithms, one function: outputs and every gradient agree to float32 rounding."""
    im2col, winograd = _conv_run("im2col", in_shape, out, padding), _conv_run("winograd", in_shape, out, padding)
    assert not im2col[0].winograd and winograd[0].winograd
    for a, b in zip(im2col[1:], winograd[1:]):
        close(b, a)


def test_winograd_gives_the_same_bits_on_a_team_of_two_and_with_one_sample_per_chunk():
    """Chunks are cut by sample counts alone and dW's parts added in chunk order."""
    one = _conv_run("winograd", (16, 12, 11), 24, 1, batch=9)
    two = _conv_run("winograd", (16, 12, 11), 24, 1, batch=9, team=2)
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_array_equal(a, b)
    Conv2d.WINOGRAD_CHUNK_BYTES, saved = 1, Conv2d.WINOGRAD_CHUNK_BYTES
    try:
        per_sample = _conv_run("winograd", (16, 12, 11), 24, 1, batch=9, team=2)
    finally:
        Conv2d.WINOGRAD_CHUNK_BYTES = saved
    for a, b in zip(per_sample[1:], one[1:]):  # other GEMM shapes and dW's terms in other groups
        close(a, b, rel=1e-6)


def test_auto_picks_winograd_for_wide_3x3_stride_1_convolutions_with_compiled_transforms():
    from ddtrain.engine import kernels
    compiled = kernels.for_array_module(np).compiled_transforms
    model = build_model([{"type": "conv2d", "out": 32, "kernel": 3, "padding": 1},
                         {"type": "conv2d", "out": 64, "kernel": 3, "padding": 1},
                         {"type": "conv2d", "out": 64, "kernel": 3, "stride": 2, "padding": 1},
                         {"type": "conv2d", "out": 8, "kernel": 3, "padding": 1},
                         {"type": "conv2d", "out": 64, "kernel": 5, "padding": 2},
                         {"type": "conv2d", "out": 64, "kernel": 3, "padding": 1, "algorithm": "im2col"}],
                        (1, 12, 12))
    assert [layer.winograd for layer in model.layers] == [False, compiled, False, False, False, False]
    assert ("Winograd" in model.layers[1].describe()) == compiled
    if os.environ.get("CI") == "true":
        assert compiled, "CI installs numba ('.[dev]'): the compiled transforms must be what runs"


def test_a_winograd_convolution_that_does_not_fit_says_what_to_use():
    with pytest.raises(ValueError, match="winograd needs kernel 3, stride 1 and padding <= 2.*im2col or auto"):
        Conv2d(8, 3, 2, 1, algorithm="winograd")
    with pytest.raises(ConfigError, match="layer 0 \\(conv2d\\): 'algorithm' must be one of auto, im2col, winograd"):
        build_model([{"type": "conv2d", "out": 8, "kernel": 3, "algorithm": "fft"}], (1, 8, 8))
    with pytest.raises(ConfigError, match="layer 0 \\(conv2d\\): algorithm winograd needs kernel 3"):
        build_model([{"type": "conv2d", "out": 8, "kernel": 5, "algorithm": "winograd"}], (1, 8, 8))
