"""Losses: gradient checks, the softmax gradient (softmax - onehot), stability, PyTorch parity, registry."""

import numpy as np
import pytest

from tests.helpers import require

from ddtrain.engine.gradcheck import check_loss
from ddtrain.engine.losses import LOSSES, MeanSquaredError, MulticlassHinge, SoftmaxCrossEntropy, make_loss
from ddtrain.errors import ConfigError


def random_batch(n=6, c=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (2 * rng.standard_normal((n, c))).astype(dtype), rng.integers(0, c, n)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradients_match_central_differences(name):
    [row] = check_loss(make_loss(name), batch=5, classes=4, seed=2)
    assert row.max_rel_error < 1e-6, row


def test_softmax_cross_entropy_gradient_is_softmax_minus_onehot_over_batch():
    """The softmax/cross-entropy derivation: dL/dZ = Y_hat - Y (per sample), averaged over the m samples."""
    logits, labels = random_batch()
    n, c = logits.shape
    loss = SoftmaxCrossEntropy()
    loss.forward(logits, labels)
    grad = loss.backward(1 / n)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(c)[labels]
    np.testing.assert_allclose(grad, (softmax - onehot) / n, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_value_is_the_summed_negative_log_likelihood():
    logits, labels = random_batch()
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.log(softmax[np.arange(len(labels)), labels]).sum()
    total = SoftmaxCrossEntropy().forward(logits, labels)
    assert isinstance(total, np.ndarray) and total.shape == ()
    assert float(total) == pytest.approx(expected, rel=1e-12)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 0.0]], np.float32)
    labels = np.array([1, 0])
    loss = SoftmaxCrossEntropy()
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        total = float(loss.forward(logits, labels))
        grad = loss.backward(0.5)
    assert total == pytest.approx(1000.0 + np.log(2), rel=1e-6)  # 1000 for row 0, log 2 for row 1
    np.testing.assert_allclose(grad, [[0.5, -0.5, 0.0], [-0.25, 0.25, 0.0]], atol=1e-7)


def test_losses_match_torch_functional():
    torch = require("torch", "torch is the comparison reference: pip install torch")
    F = torch.nn.functional
    logits, labels = random_batch(n=7, c=5)
    n, c = logits.shape
    tz, ty = torch.from_numpy(logits), torch.from_numpy(labels)
    onehot = F.one_hot(ty, c).double()
    expected = {
        "cross_entropy": F.cross_entropy(tz, ty, reduction="sum"),
        # MSELoss(reduction='mean') over one sample's C outputs, summed over samples
        "mse": F.mse_loss(tz, onehot, reduction="mean") * n,
        # torch's multi_margin_loss divides each sample's hinge sum by C
        "hinge": F.multi_margin_loss(tz, ty, reduction="sum") * c,
    }
    for name, ref in expected.items():
        got = make_loss(name).forward(logits, labels)
        assert float(got) == pytest.approx(ref.item(), rel=1e-12), name


def test_mse_and_hinge_gradients_by_hand():
    logits = np.array([[0.5, 2.0, -1.0]])
    labels = np.array([1])
    mse = MeanSquaredError()
    assert float(mse.forward(logits, labels)) == pytest.approx((0.25 + 1.0 + 1.0) / 3)
    np.testing.assert_allclose(mse.backward(1.0), [[2 * 0.5 / 3, 2 * 1.0 / 3, 2 * -1.0 / 3]])
    hinge = MulticlassHinge()
    scores = np.array([[3.2, 5.1, -1.7]])  # cs231n's worked example: the cat image, label 0
    assert float(hinge.forward(scores, np.array([0]))) == pytest.approx(2.9)
    np.testing.assert_allclose(hinge.backward(1.0), [[-1.0, 1.0, 0.0]])


def test_slices_scaled_by_the_global_batch_give_the_global_mean_gradient():
    """The data-parallel contract: rank gradients with scale 1/global are slices of the global one."""
    logits, labels = random_batch(n=8)
    for name in LOSSES:
        full = make_loss(name)
        full.forward(logits, labels)
        expected = full.backward(1 / 8).copy()
        parts = []
        for lo, hi in [(0, 3), (3, 8)]:
            part = make_loss(name)
            part.forward(logits[lo:hi], labels[lo:hi])
            parts.append(part.backward(1 / 8).copy())
        np.testing.assert_allclose(np.concatenate(parts), expected, rtol=1e-14, err_msg=name)


def test_softmax_cross_entropy_is_the_same_for_row_and_column_major_logits():
    """Linear writes logits column-major and the loss's buffers follow their order: the loss, the
    gradient and the accuracy count are those of the row-major logits, bit for bit."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((37, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 37)
    loss_c, loss_f = SoftmaxCrossEntropy(), SoftmaxCrossEntropy()
    value_c = float(loss_c.forward(logits, labels))
    grad_c = loss_c.backward(1 / 37).copy()
    fortran = np.asfortranarray(logits)
    value_f = float(loss_f.forward(fortran, labels))
    grad_f = loss_f.backward(1 / 37)
    assert grad_f.flags.f_contiguous
    assert value_f == pytest.approx(value_c, rel=1e-6)
    np.testing.assert_allclose(grad_f, grad_c, rtol=1e-6, atol=1e-9)
    assert int(loss_f.correct(fortran, labels)) == int(loss_c.correct(logits, labels))


def test_correct_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    assert int(SoftmaxCrossEntropy().correct(logits, np.array([1, 1, 1]))) == 2


def test_unknown_loss_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown loss 'cross_entropi' \(did you mean 'cross_entropy'\?\)"):
        make_loss("cross_entropi")


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_torch_value_and_gradient(smoothing):
    """CrossEntropyLoss(label_smoothing=e): target (1 - e) * onehot + e / C, value and gradient."""
    torch = require("torch", "torch is the comparison reference: pip install torch")
    logits, labels = random_batch(n=7, c=5)
    tz = torch.from_numpy(logits).requires_grad_()
    ref = torch.nn.functional.cross_entropy(tz, torch.from_numpy(labels), reduction="mean",
                                            label_smoothing=smoothing)
    ref.backward()
    loss = make_loss("cross_entropy", label_smoothing=smoothing)
    got = loss.forward(logits, labels) / len(labels)
    assert float(got) == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(loss.backward(1 / len(labels)), tz.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_label_smoothing_gradient_matches_central_differences():
    [row] = check_loss(make_loss("cross_entropy", label_smoothing=0.2), batch=5, classes=4, seed=3)
    assert row.max_rel_error < 1e-6, row


def test_label_smoothing_is_validated_in_the_config():
    from ddtrain.config import load_config
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        load_config("mlp", sets=["model.label_smoothing=1.5"])
    with pytest.raises(ConfigError, match="cross_entropy only"):
        load_config("mlp", sets=["model.loss=mse", "model.label_smoothing=0.1"])
