"""Learning-rate schedules: pure functions of the optimizer step, so a resumed run
(which restores the step count) gets exactly the rates it would have had.

``lr(step)`` is the rate for the update that follows ``step`` updates (0-based).
Every schedule may start with a linear warm-up: during the first `warmup_steps`
steps the rate is scaled by (step + 1) / warmup_steps, rising from base_lr/warmup_steps
to base_lr (so no step is wasted with a zero rate).
  constant: base_lr.
  step:     base_lr * gamma ** (step // step_size).
  cosine:   after warm-up, base_lr decays to min_lr along half a cosine, reaching min_lr
            at total_steps (and staying there if training runs longer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddtrain import choices
from ddtrain.choices import unknown
from ddtrain.errors import ConfigError

SCHEDULES = choices.SCHEDULES


@dataclass(frozen=True)
class Schedule:
    name: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.1
    min_lr: float = 0.0

    def lr(self, step: int) -> float:
        """The learning rate for the update after `step` updates (step >= 0)."""
        if self.name == "constant":
            rate = self.base_lr
        elif self.name == "step":
            rate = self.base_lr * self.gamma ** (step // self.step_size)
        else:  # cosine, measured from the end of warm-up
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
            rate = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step < self.warmup_steps:
            rate *= (step + 1) / self.warmup_steps
        return rate


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  step_size: int | None = None, gamma: float = 0.1, min_lr: float = 0.0) -> Schedule:
    """A schedule by name; ConfigError for an unknown name or values that make no sense."""
    if name not in SCHEDULES:
        raise ConfigError(unknown("lr schedule", name, SCHEDULES))
    if not base_lr > 0:
        raise ConfigError(f"learning rate must be > 0, not {base_lr}")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, not {warmup_steps}")
    if name == "step" and (step_size is None or step_size < 1):
        raise ConfigError(f"the step schedule needs step_size >= 1 (steps between decays), not {step_size}")
    if name == "cosine" and not 0 <= min_lr <= base_lr:
        raise ConfigError(f"cosine min_lr must be in [0, base_lr={base_lr}], not {min_lr}")
    return Schedule(name, float(base_lr), int(total_steps), int(warmup_steps), step_size, float(gamma),
                    float(min_lr))
