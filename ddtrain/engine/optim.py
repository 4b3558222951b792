"""Optimizers over the flat parameter vector, with torch.optim's exact update rules.

Each ``step(lr)`` reads ``params.grad`` and updates ``params.data`` in place: SGD through
the kernels chosen once for the process (ddtrain.engine.kernels: one compiled pass with
numba, else ufuncs and one-pass BLAS axpby, the same bits), Adam with a handful of
whole-vector ufuncs into preallocated temporaries (the grad is never modified, so it can
still be logged or checked after the step). ``step(lr, check=True)`` also says whether the
gradient it read held a NaN or infinity (the update is made either way): where every rank
updates from the same summed gradient, the trainer lets this check replace the one before
the sum, as the compiled SGD pass makes it without a second read of the gradient.
Hyperparameters are plain attributes fixed at construction; state (momentum, moments, step
count) lives in ``self.state`` and ``self.steps``, is created on the first step, and
round-trips through ``state_dict()`` / ``load_state_dict()`` as host arrays, so a resumed run
continues bit for bit. The learning rate comes from the schedule at every step.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from ddtrain.engine.kernels import for_array_module, l2_added, nonfinite
from ddtrain.engine.params import FlatParams
from ddtrain.choices import registry, unknown
from ddtrain import choices
from ddtrain.errors import CheckpointError, ConfigError


class Optimizer:
    """Shared plumbing. Subclasses define `_update(lr)` and the names in `state_keys`."""

    state_keys: tuple[str, ...] = ()

    def __init__(self, params: FlatParams):
        self.params = params
        self.xp = params.backend.xp
        self.state: dict = {}  # name -> flat device array, same size as params.data
        self.steps = 0  # optimizer steps taken
        self._temps: list = []

    def _temp(self, k: int):
        """The k-th scratch vector (allocated on first use, like torch's intermediates but once)."""
        while len(self._temps) <= k:
            self._temps.append(self.xp.empty_like(self.params.data))
        return self._temps[k]

    def step(self, lr: float, check: bool = False) -> int:
        """One update of params.data from params.grad with learning rate `lr`. Returns 1 if
        `check` and the gradient held a NaN or infinity (the update is made anyway), else 0."""
        self.steps += 1
        return self._update(float(lr), check)

    def _update(self, lr: float, check: bool) -> int:
        raise NotImplementedError

    def _weight_decayed_grad(self, wd: float):
        """grad + wd * param (L2 as torch adds it), or grad itself when wd == 0."""
        return l2_added(self.xp, self.params.grad, self.params.data, wd, self._temp(0) if wd else None)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the state: flat arrays by name plus "step" = array([steps])."""
        out = {k: np.array(self.params.backend.to_host(v)) for k, v in self.state.items()}
        out["step"] = np.array([self.steps], dtype=np.int64)
        return out

    def load_state_dict(self, d: dict) -> None:
        """Restore what `state_dict` returned (copies in); CheckpointError if it does not fit."""
        name = type(self).__name__
        if "step" not in d:
            raise CheckpointError(f"{name} state has no 'step' entry (keys: {sorted(d)})")
        steps = int(np.asarray(d["step"]).reshape(-1)[0])
        keys = set(d) - {"step"}
        expected = set(self.state_keys) if steps > 0 else set()
        if keys != expected:
            raise CheckpointError(f"{name} state has {sorted(keys)}, expected {sorted(expected)} "
                                  f"(was the checkpoint written with another optimizer or momentum?)")
        state = {}
        for k in keys:
            a = np.asarray(d[k])
            if a.shape != (self.params.size,):
                raise CheckpointError(f"{name} state {k!r} has shape {a.shape}, "
                                      f"the model has {self.params.size} parameters")
            state[k] = self.xp.array(a, dtype=self.params.data.dtype)
        self.state, self.steps = state, steps


class SGD(Optimizer):
    """torch.optim.SGD without dampening:
        g = grad + wd * p;  buf = g (first step), else buf = m * buf + g;
        d = g + m * buf (nesterov) or buf (momentum) or g;  p -= lr * d.
    """

    def __init__(self, params: FlatParams, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(params)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"sgd momentum must be in [0, 1), not {momentum}")
        if nesterov and momentum == 0:
            raise ConfigError("sgd nesterov needs momentum > 0")
        if weight_decay < 0:
            raise ConfigError(f"sgd weight_decay must be >= 0, not {weight_decay}")
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.state_keys = ("momentum",) if momentum else ()
        self.kernels = for_array_module(self.xp)

    def _update(self, lr, check):
        p = self.params.data
        first = self.momentum and "momentum" not in self.state
        if first:
            self.state["momentum"] = self.xp.empty_like(p)
        return self.kernels.sgd(p, self.params.grad, self.state.get("momentum"), momentum=self.momentum,
                                nesterov=self.nesterov, weight_decay=self.weight_decay, lr=lr, first=first,
                                temps=self._temp, check=check)


class Adam(Optimizer):
    """torch.optim.Adam (weight_decay is L2 added to the gradient):
        g = grad + wd * p;  m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g^2;
        p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params: FlatParams, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params)
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ConfigError(f"{type(self).__name__.lower()} betas must be in [0, 1), not {tuple(betas)}")
        if eps <= 0 or weight_decay < 0:
            raise ConfigError(f"{type(self).__name__.lower()} needs eps > 0 and weight_decay >= 0, "
                              f"not eps={eps}, weight_decay={weight_decay}")
        self.betas, self.eps, self.weight_decay = (b1, b2), float(eps), float(weight_decay)

    def _update(self, lr, check):
        xp, p = self.xp, self.params.data
        bad = nonfinite(xp, self.params.grad) if check else 0
        b1, b2 = self.betas
        if self.decoupled:
            xp.multiply(p, 1.0 - lr * self.weight_decay, out=p)
            g = self.params.grad
        else:
            g = self._weight_decayed_grad(self.weight_decay)
        if not self.state:
            self.state = {"exp_avg": xp.zeros_like(p), "exp_avg_sq": xp.zeros_like(p)}
        m, v, t = self.state["exp_avg"], self.state["exp_avg_sq"], self._temp(1)
        xp.subtract(g, m, out=t)  # m += (1 - b1) * (g - m): torch's lerp_
        xp.multiply(t, 1.0 - b1, out=t)
        xp.add(m, t, out=m)
        xp.multiply(g, g, out=t)
        xp.multiply(t, 1.0 - b2, out=t)
        xp.multiply(v, b2, out=v)
        xp.add(v, t, out=v)
        step_size = lr / (1.0 - b1 ** self.steps)
        xp.sqrt(v, out=t)
        xp.divide(t, math.sqrt(1.0 - b2 ** self.steps), out=t)
        xp.add(t, self.eps, out=t)
        xp.divide(m, t, out=t)
        xp.multiply(t, step_size, out=t)
        xp.subtract(p, t, out=p)
        return bad


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay p *= 1 - lr * wd, then Adam without L2."""

    decoupled = True

    def __init__(self, params: FlatParams, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, betas, eps, weight_decay)


OPTIMIZERS = registry(choices.OPTIMIZERS, {"sgd": SGD, "adam": Adam, "adamw": AdamW})


def make_optimizer(name: str, params: FlatParams, **hyper) -> Optimizer:
    """An optimizer by registry name with hyperparameters from the config (lr is per step).

    ConfigError for an unknown name or hyperparameter, with a suggestion and the valid ones.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(unknown("optimizer", name, OPTIMIZERS))
    cls = OPTIMIZERS[name]
    valid = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")]
    for key in hyper:
        if key not in valid:
            raise ConfigError(unknown(f"{name} option", key, valid))
    return cls(params, **hyper)
