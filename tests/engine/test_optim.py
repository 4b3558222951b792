"""Optimizers (torch.optim semantics on the flat vector) and learning-rate schedules."""

import math

import numpy as np
import pytest

from tests.helpers import require

from ddtrain.engine.optim import OPTIMIZERS, make_optimizer
from ddtrain.engine.params import FlatParams
from ddtrain.engine.schedules import make_schedule
from ddtrain.errors import CheckpointError, ConfigError

SHAPES = [("0.weight", (3, 4)), ("0.bias", (3,)), ("2.weight", (2, 3))]


def flat_params(dtype=np.float64, seed=0):
    params = FlatParams(SHAPES, dtype=dtype)
    params.data[...] = np.random.default_rng(seed).standard_normal(params.size)
    return params


def grad_sequence(size, steps, seed=1):
    return np.random.default_rng(seed).standard_normal((steps, size))


def test_sgd_momentum_two_steps_by_hand():
    params = FlatParams([("w", (2,))], dtype=np.float64)
    params.data[...] = [1.0, -2.0]
    opt = make_optimizer("sgd", params, momentum=0.9)
    params.grad[...] = [0.5, 1.0]
    opt.step(0.1)  # buf = g = [0.5, 1];  p = [1, -2] - 0.1 * buf
    np.testing.assert_allclose(params.data, [0.95, -2.1])
    params.grad[...] = [-1.0, 0.25]
    opt.step(0.1)  # buf = 0.9 * [0.5, 1] + [-1, 0.25] = [-0.55, 1.15]
    np.testing.assert_allclose(params.data, [1.005, -2.215])
    np.testing.assert_allclose(opt.state_dict()["momentum"], [-0.55, 1.15])


def test_sgd_nesterov_two_steps_by_hand():
    params = FlatParams([("w", (2,))], dtype=np.float64)
    params.data[...] = [1.0, -2.0]
    opt = make_optimizer("sgd", params, momentum=0.9, nesterov=True)
    params.grad[...] = [0.5, 1.0]
    opt.step(0.1)  # d = g + 0.9 * buf = 1.9 g
    np.testing.assert_allclose(params.data, [0.905, -2.19])
    params.grad[...] = [-1.0, 0.25]
    opt.step(0.1)  # buf = [-0.55, 1.15], d = g + 0.9 buf = [-1.495, 1.285]
    np.testing.assert_allclose(params.data, [1.0545, -2.3185])


TORCH_CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", {"weight_decay": 0.1}),
    ("adam", {}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("adamw", {}),
    ("adamw", {"betas": (0.85, 0.95), "weight_decay": 0.1}),
]


@pytest.mark.parametrize("name, hyper", TORCH_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_CASES)])
def test_optimizers_match_torch_step_by_step(name, hyper):
    torch = require("torch", "torch is the comparison reference: pip install torch")
    steps, lrs = 6, [0.1, 0.05, 0.05, 0.02, 0.2, 0.01]  # the rate changes, as under a schedule
    params = flat_params()
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in params.state_dict().values()]
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    ref = torch_cls(tensors, lr=lrs[0], **hyper)
    opt = make_optimizer(name, params, **hyper)
    grads = grad_sequence(params.size, steps)
    for step in range(steps):
        params.grad[...] = grads[step]
        opt.step(lrs[step])
        for group in ref.param_groups:
            group["lr"] = lrs[step]
        for t, slot in zip(tensors, params.slots):
            t.grad = torch.from_numpy(grads[step][slot.start:slot.stop].reshape(slot.shape).copy())
        ref.step()
        expected = np.concatenate([t.detach().numpy().ravel() for t in tensors])
        np.testing.assert_allclose(params.data, expected, rtol=1e-12, atol=1e-14, err_msg=f"step {step}")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float32_step_leaves_grad_alone_and_updates_in_place(name):
    params = flat_params(np.float32)
    data_buffer = params.data
    params.grad[...] = grad_sequence(params.size, 1)[0]
    grad_before = params.grad.copy()
    opt = make_optimizer(name, params)
    opt.step(0.01)
    assert params.data is data_buffer and params.data.dtype == np.float32
    np.testing.assert_array_equal(params.grad, grad_before)
    assert all(np.shares_memory(v, params.data) for v in params.params.values())


def test_axpby_remembers_addresses_only_of_the_arrays_it_was_given():
    """blas.axpby caches data addresses by array identity: a new array (even a view of the same
    memory, or one that reuses a freed array's id) gets its own, and the results are a*x + b*y."""
    from ddtrain.engine import blas
    rng = np.random.default_rng(0)
    scratch = np.empty(1000, np.float32)
    for _ in range(3 * blas._MAX_ADDRESSES):  # more arrays than the cache holds
        x, y = rng.standard_normal((2, 1000)).astype(np.float32)
        expected = np.float32(2.0) * x + np.float32(0.5) * y
        blas.axpby(2.0, x, 0.5, y, scratch=scratch)
        np.testing.assert_allclose(y, expected, rtol=1e-6)
    base = rng.standard_normal(2000).astype(np.float32)
    for lo in (0, 1000):  # views at different offsets into one buffer
        view, x = base[lo:lo + 1000], np.ones(1000, np.float32)
        expected = view + x
        blas.axpby(1.0, x, 1.0, view, scratch=scratch)
        np.testing.assert_allclose(base[lo:lo + 1000], expected, rtol=1e-6)


@pytest.mark.parametrize("name, hyper", [("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {})])
def test_resume_from_state_dict_continues_bit_for_bit(name, hyper):
    grads = grad_sequence(flat_params().size, 5)
    straight = flat_params(np.float32)
    opt = make_optimizer(name, straight, **hyper)
    for g in grads:
        straight.grad[...] = g
        opt.step(0.01)

    first = flat_params(np.float32)
    opt1 = make_optimizer(name, first, **hyper)
    for g in grads[:3]:
        first.grad[...] = g
        opt1.step(0.01)
    saved_params, saved_state = first.state_dict(), opt1.state_dict()
    assert int(saved_state["step"][0]) == 3

    resumed = FlatParams(SHAPES, dtype=np.float32)
    resumed.load_state_dict(saved_params)
    opt2 = make_optimizer(name, resumed, **hyper)
    opt2.load_state_dict(saved_state)
    for g in grads[3:]:
        resumed.grad[...] = g
        opt2.step(0.01)
    np.testing.assert_array_equal(resumed.data, straight.data)


def test_state_dict_is_a_host_copy():
    params = flat_params()
    opt = make_optimizer("sgd", params, momentum=0.5)
    params.grad[...] = 1.0
    opt.step(0.1)
    state = opt.state_dict()
    state["momentum"][...] = 123.0
    assert not np.any(opt.state["momentum"] == 123.0)


def test_load_state_dict_rejects_state_that_does_not_fit():
    params = flat_params()
    opt = make_optimizer("adam", params)
    with pytest.raises(CheckpointError, match="parameters"):
        opt.load_state_dict({"step": np.array([2]), "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)})
    with pytest.raises(CheckpointError, match="another optimizer"):
        opt.load_state_dict({"step": np.array([2]), "momentum": np.zeros(params.size)})


def test_make_optimizer_errors_name_the_fix():
    params = flat_params()
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamm' \(did you mean 'adam'\?\)"):
        make_optimizer("adamm", params)
    with pytest.raises(ConfigError, match=r"unknown sgd option 'momentun' \(did you mean 'momentum'\?\)"):
        make_optimizer("sgd", params, momentun=0.9)
    with pytest.raises(ConfigError, match="nesterov needs momentum"):
        make_optimizer("sgd", params, nesterov=True)


# -- schedules ---------------------------------------------------------------------------------

def test_constant_schedule():
    s = make_schedule("constant", 0.1, total_steps=100)
    assert [s.lr(k) for k in (0, 50, 1000)] == [0.1, 0.1, 0.1]


def test_step_schedule_multiplies_by_gamma_every_step_size():
    s = make_schedule("step", 0.1, total_steps=100, step_size=10, gamma=0.5)
    assert [s.lr(k) for k in (0, 9, 10, 19, 20, 35)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.0125])


def test_cosine_schedule_with_warmup():
    s = make_schedule("cosine", 1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s.lr(0) == pytest.approx(0.1)  # (0 + 1) / 10 of base: warm-up never takes a zero step
    assert s.lr(4) == pytest.approx(0.5)
    assert s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0)  # cosine starts at base_lr
    assert s.lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean of base and min
    assert s.lr(85) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert s.lr(110) == pytest.approx(0.1) and s.lr(500) == pytest.approx(0.1)


def test_schedule_errors():
    with pytest.raises(ConfigError, match=r"did you mean 'cosine'"):
        make_schedule("cosin", 0.1, 10)
    with pytest.raises(ConfigError, match="step_size"):
        make_schedule("step", 0.1, 10)
