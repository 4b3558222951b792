"""Numerical gradient checks (cs231n style), in float64 on the CPU.

Each check compares the engine's analytic gradient `a` with central differences
n_i = (f(w + h e_i) - f(w - h e_i)) / 2h of a scalar f: for a layer, f = sum(dy * y) with
a fixed random upstream gradient dy (so every output element matters); for a loss or
a model, f = scale * loss_sum. The error of a tensor is

    max_i |a_i - n_i| / max(max_i (|a_i| + |n_i|), tiny)

i.e. the worst difference relative to the tensor's gradient scale (elementwise ratios
blow up on entries whose true gradient is ~0, where finite differences are pure noise).
A correct float64 implementation gives ~1e-8 or less; the pass mark is 1e-6.

Dropout is checked with a fixed mask: the batch context does not change between the
+h and -h evaluations, so every forward draws the same mask.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ddtrain.backend import CPU
from ddtrain.engine.context import single_batch
from ddtrain.engine.layers import Layer
from ddtrain.engine.losses import Loss, make_loss
from ddtrain.engine.model import build_model
from ddtrain.engine.params import FlatParams

TOLERANCE = 1e-6
STEP = 1e-5  # h ~ cbrt(float64 eps): truncation error ~h^2 and rounding ~1e-16/h balance
TINY = 1e-30


class GradRow(NamedTuple):
    name: str  # what was checked: a layer, a loss or a model layer ("1 linear")
    param: str  # which tensor: "weight", "bias", "input", "logits"
    max_rel_error: float
    passed: bool


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max|a - n| / max(max(|a| + |n|), tiny) over the checked entries."""
    a, n = np.asarray(analytic, np.float64).ravel(), np.asarray(numeric, np.float64).ravel()
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n)) / max(float(np.max(np.abs(a) + np.abs(n))), TINY))


def _numeric(f, flat: np.ndarray, indices) -> np.ndarray:
    """Central differences of f() with respect to flat[i] for i in indices (flat is restored)."""
    out = np.empty(len(indices))
    for k, i in enumerate(indices):
        old = flat[i]
        flat[i] = old + STEP
        plus = f()
        flat[i] = old - STEP
        minus = f()
        flat[i] = old
        out[k] = (plus - minus) / (2 * STEP)
    return out


def _pick(size: int, max_checks: int | None, rng: np.random.Generator) -> np.ndarray:
    """All indices of a tensor, or `max_checks` random ones for big tensors."""
    if max_checks is None or size <= max_checks:
        return np.arange(size)
    return np.sort(rng.choice(size, max_checks, replace=False))


def _away_from_kinks(x: np.ndarray) -> np.ndarray:
    """Move entries within 1e-3 of 0 to +-0.5: ReLU's kink at 0 has no derivative to check."""
    near = np.abs(x) < 1e-3
    x[near] = np.where(x[near] < 0, -0.5, 0.5)
    return x


def check_layer(layer: Layer, in_shape: tuple, batch: int = 3, seed: int = 0,
                max_checks: int | None = None, tol: float = TOLERANCE) -> list[GradRow]:
    """Check one layer's parameter gradients and dx, on x of shape (batch, *in_shape).

    The layer is bound to fresh float64 buffers filled with N(0, 0.5^2) (not its init
    scheme, so biases are non-zero too), and to fresh buffers of its own (BatchNorm's running
    statistics; training uses the batch's). One row per parameter, then one for "input".
    """
    rng = np.random.default_rng(seed)
    in_shape = tuple(in_shape)
    specs = list(layer.param_shapes(in_shape).items())
    flat = FlatParams(specs, CPU, np.float64)
    layer.xp, layer.index, layer.needs_input_grad = np, 0, True
    layer.bind(flat.params, flat.grads)
    layer.bind_buffers({name: np.zeros(shape, dtype) for name, (shape, dtype) in layer.buffer_shapes(in_shape).items()})
    layer.init_buffers()
    flat.data[...] = 0.5 * rng.standard_normal(flat.size)
    layer.set_batch_context(single_batch(seed, 0, batch))
    x = _away_from_kinks(rng.standard_normal((batch, *in_shape)))
    dy = rng.standard_normal((batch, *layer.output_shape(in_shape)))

    layer.forward(x, train=True)
    dx = np.array(layer.backward(dy))
    grad = flat.grad.copy()

    def f():
        return float(np.sum(layer.forward(x, train=True) * dy))

    name = layer.describe()
    rows = []
    for slot in flat.slots:
        idx = _pick(slot.stop - slot.start, max_checks, rng)
        num = _numeric(f, flat.data[slot.start:slot.stop], idx)
        err = rel_error(grad[slot.start:slot.stop][idx], num)
        rows.append(GradRow(name, slot.name, err, err < tol))
    idx = _pick(x.size, max_checks, rng)
    err = rel_error(dx.ravel()[idx], _numeric(f, x.reshape(-1), idx))
    rows.append(GradRow(name, "input", err, err < tol))
    return rows


def check_loss(loss: Loss | str, batch: int = 4, classes: int = 5, seed: int = 0,
               tol: float = TOLERANCE) -> list[GradRow]:
    """Check d(scale * loss_sum)/d logits for logits (batch, classes), scale = 1/batch."""
    if isinstance(loss, str):
        loss = make_loss(loss)
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((batch, classes))
    labels = rng.integers(0, classes, batch)
    scale = 1.0 / batch
    loss.forward(logits, labels)
    analytic = np.array(loss.backward(scale))

    def f():
        return scale * float(loss.forward(logits, labels))

    num = _numeric(f, logits.reshape(-1), np.arange(logits.size))
    err = rel_error(analytic, num)
    return [GradRow(type(loss).__name__, "logits", err, err < tol)]


def check_model(layer_specs: list[dict], in_shape: tuple, loss_name: str = "cross_entropy",
                batch: int = 4, seed: int = 0, max_checks: int | None = 30,
                tol: float = TOLERANCE) -> list[GradRow]:
    """Check a whole model from config entries, end to end through the loss, in float64.

    Every parameter tensor gets a row (at most `max_checks` random entries of each are
    perturbed, so real-size models finish in about a second), plus one for the input.
    """
    rng = np.random.default_rng(seed)
    model = build_model(layer_specs, in_shape, CPU, init="pytorch", seed=seed, dtype=np.float64,
                        input_grad=True)
    loss = make_loss(loss_name)
    classes = model.out_shape[-1]
    x = _away_from_kinks(rng.standard_normal((batch, *model.in_shape)))
    labels = rng.integers(0, classes, batch)
    scale = 1.0 / batch
    model.set_batch_context(single_batch(seed, 0, batch))

    loss.forward(model.forward(x, train=True), labels)
    dx = np.array(model.backward(loss.backward(scale)))
    grad = model.params.grad.copy()

    def f():
        return scale * float(loss.forward(model.forward(x, train=True), labels))

    rows = []
    for slot in model.params.slots:
        i, pname = slot.name.split(".", 1)
        idx = _pick(slot.stop - slot.start, max_checks, rng)
        num = _numeric(f, model.params.data[slot.start:slot.stop], idx)
        err = rel_error(grad[slot.start:slot.stop][idx], num)
        rows.append(GradRow(f"{i} {layer_specs[int(i)]['type']}", pname, err, err < tol))
    idx = _pick(x.size, max_checks, rng)
    err = rel_error(dx.ravel()[idx], _numeric(f, x.reshape(-1), idx))
    rows.append(GradRow("model", "input", err, err < tol))
    return rows


def gradcheck_config(layer_specs: list[dict], in_shape: tuple, loss_name: str) -> list[GradRow]:
    """What ``ddtrain gradcheck --config F`` runs: the config's model end to end (sampled
    entries of every tensor, and the input), then its loss alone. ConfigError if the
    layers or the loss name are invalid."""
    return check_model(layer_specs, in_shape, loss_name) + check_loss(make_loss(loss_name))


def format_table(rows: list[GradRow]) -> str:
    """An aligned table, one line per row, then how many passed."""
    table = [("checked", "tensor", "max rel error", "result")]
    table += [(r.name, r.param, f"{r.max_rel_error:.2e}", "ok" if r.passed else "FAIL") for r in rows]
    widths = [max(len(t[k]) for t in table) for k in range(4)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(t, widths)).rstrip() for t in table]
    passed = sum(r.passed for r in rows)
    lines.append(f"{passed}/{len(rows)} passed (pass mark: max rel error < {TOLERANCE:g})")
    return "\n".join(lines)

