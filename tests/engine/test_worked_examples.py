"""Worked examples of backpropagation (chain rule, gates, matrix derivatives, a 2-layer net, softmax), computed by the engine's layers."""

import numpy as np
import pytest

from ddtrain.engine.layers import Linear, ReLU, Sigmoid
from ddtrain.engine.losses import SoftmaxCrossEntropy
from ddtrain.engine.model import Sequential


def model_with(layers, in_shape, weights):
    """A float64 Sequential whose parameters are set to `weights` (name -> array), dx enabled."""
    model = Sequential(layers, in_shape, dtype=np.float64, input_grad=True)
    model.params.load_state_dict({k: np.asarray(v, np.float64) for k, v in weights.items()})
    return model


def test_chain_rule_add_then_multiply_gate():
    """The backprop notes' gate example: f(x, y, z) = (x + y) z at (-2, 5, -4): df/dx = df/dy = z = -4, df/dz = x + y = 3.

    q = x + y is a bias-free Linear with weights [1, 1] (the add gate); f = q z is a bias-free
    Linear with weight [z] (the multiply gate), so df/dz is that weight's gradient.
    """
    x, y, z = -2.0, 5.0, -4.0
    model = model_with([Linear(1, bias=False), Linear(1, bias=False)], (2,),
                       {"0.weight": [[1.0, 1.0]], "1.weight": [[z]]})
    f = model.forward(np.array([[x, y]]), train=True)
    assert f[0, 0] == pytest.approx(-12.0)
    dxy = model.backward(np.array([[1.0]]))  # df/df = 1
    np.testing.assert_allclose(dxy, [[-4.0, -4.0]])
    assert model.params.grads["1.weight"][0, 0] == pytest.approx(3.0)


def test_sigmoid_gate_at_one():
    """The backprop notes' sigmoid: L = 1 / (1 + e^-x) at x = 1 gives dL/dx = sigma (1 - sigma) = 0.1966 (0.20 in the notes)."""
    model = model_with([Sigmoid()], (1,), {})
    assert model.forward(np.array([[1.0]]), train=True)[0, 0] == pytest.approx(0.7311, abs=1e-4)
    assert model.backward(np.array([[1.0]]))[0, 0] == pytest.approx(0.1966, abs=1e-4)


def test_squared_norm_of_a_matrix_vector_product():
    """The backprop notes' matrix example: f(W, x) = ||W x||^2 with q = W x: f = 0.116, df/dq = 2q, df/dW = 2 q x^T, df/dx = 2 W^T q."""
    W = [[0.1, 0.5], [-0.3, 0.8]]
    model = model_with([Linear(2, bias=False)], (2,), {"0.weight": W})
    q = model.forward(np.array([[0.2, 0.4]]), train=True).copy()
    np.testing.assert_allclose(q, [[0.22, 0.26]])
    assert float((q ** 2).sum()) == pytest.approx(0.116)
    dx = model.backward(2 * q)
    np.testing.assert_allclose(model.params.grads["0.weight"], [[0.088, 0.176], [0.104, 0.208]])
    np.testing.assert_allclose(dx, [[-0.112, 0.636]])


def test_two_layer_sigmoid_network_matches_the_notes_hand_backprop():
    """The vectorised-gradient notes' numpy 2-layer net: h = sigmoid(x w1), y_pred = h w2, loss = sum (y_pred - y)^2.

    The notes store w as (in, out); the engine stores PyTorch's (out, in), hence the transposes.
    """
    rng = np.random.default_rng(0)
    n, d_in, hidden, d_out = 8, 20, 10, 3
    x, y = rng.standard_normal((n, d_in)), rng.standard_normal((n, d_out))
    w1, w2 = rng.standard_normal((d_in, hidden)), rng.standard_normal((hidden, d_out))

    h = 1 / (1 + np.exp(-x.dot(w1)))
    y_pred = h.dot(w2)
    grad_y_pred = 2.0 * (y_pred - y)
    grad_w2 = h.T.dot(grad_y_pred)
    grad_h = grad_y_pred.dot(w2.T)
    grad_w1 = x.T.dot(grad_h * h * (1 - h))

    model = model_with([Linear(hidden, bias=False), Sigmoid(), Linear(d_out, bias=False)], (d_in,),
                       {"0.weight": w1.T, "2.weight": w2.T})
    np.testing.assert_allclose(model.forward(x, train=True), y_pred, rtol=1e-12)
    model.backward(grad_y_pred)
    np.testing.assert_allclose(model.params.grads["2.weight"], grad_w2.T, rtol=1e-12)
    np.testing.assert_allclose(model.params.grads["0.weight"], grad_w1.T, rtol=1e-12)


def test_relu_softmax_network_matches_the_notes_derivation():
    """The hand-derived MLP: Z1 = W1 X + b1, A1 = ReLU(Z1), Z2 = W2 A1 + b2, Y_hat = softmax(Z2), samples in columns;
    DZ2 = Y_hat - Y, DW2 = DZ2 A1^T / m, Db2 = sum(DZ2) / m, DZ1 = W2^T DZ2 * ReLU'(Z1),
    DW1 = DZ1 X^T / m (the notes' (19) writes DZ2, a typo: the shapes only fit DZ1), Db1 = sum(DZ1) / m.
    """
    rng = np.random.default_rng(1)
    m, n_in, n = 6, 5, 4
    X = rng.standard_normal((n_in, m))
    labels = rng.integers(0, n, m)
    Y = np.eye(n)[labels].T
    W1, b1 = rng.standard_normal((n, n_in)), rng.standard_normal((n, 1))
    W2, b2 = rng.standard_normal((n, n)), rng.standard_normal((n, 1))

    Z1 = W1 @ X + b1
    A1 = np.maximum(Z1, 0)
    Z2 = W2 @ A1 + b2
    Y_hat = np.exp(Z2) / np.exp(Z2).sum(axis=0)
    DZ2 = Y_hat - Y
    DW2, Db2 = DZ2 @ A1.T / m, DZ2.sum(axis=1) / m
    DZ1 = (W2.T @ DZ2) * (Z1 > 0)
    DW1, Db1 = DZ1 @ X.T / m, DZ1.sum(axis=1) / m

    model = model_with([Linear(n), ReLU(), Linear(n)], (n_in,),
                       {"0.weight": W1, "0.bias": b1[:, 0], "2.weight": W2, "2.bias": b2[:, 0]})
    loss = SoftmaxCrossEntropy()
    loss.forward(model.forward(X.T, train=True), labels)
    model.backward(loss.backward(1 / m))
    g = model.params.grads
    for got, want in [(g["2.weight"], DW2), (g["2.bias"], Db2), (g["0.weight"], DW1), (g["0.bias"], Db1)]:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
