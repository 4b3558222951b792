"""One process: nothing to combine."""

from __future__ import annotations

from ddtrain.engine.context import local_sums
from ddtrain.parallel.sync.base import StepFlags, SyncBase


class OneProcess(SyncBase):
    """The sync of a one-process run: the gradient of the whole batch is already the mean.

    Rules: none beyond the interface's. Failure modes: none (no collective is ever called);
    `synchronize` only checks the gradient for non-finite values.
    """

    label = "none (one process)"

    def __init__(self, comm, model):
        super().__init__(comm, model)
        self.weights_can_differ = False

    def broadcast_initial_state(self) -> None:
        return None

    def batch_sum(self, key, local, on_global=None):
        return local_sums(key, local, on_global)

    def synchronize(self, flags: StepFlags) -> StepFlags:
        return StepFlags(stop=flags.stop, nonfinite=self.local_nonfinite())
