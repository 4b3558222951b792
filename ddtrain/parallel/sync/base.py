"""The gradient-sync interface: everything that differs between ways of combining gradients.

The trainer runs one step the same way whatever the sync (ddtrain/train/trainer.py):

    for (a, b) in sync.batch_parts(B):              # this rank's rows of the global batch
        model.set_batch_context(sync.context(seed, step, a, B))
        forward + backward on rows [a, b)           # backward calls sync.on_grads_ready
        sync.part_done()
    flags = sync.synchronize(StepFlags(stop=...))   # "gradients synchronised"
    if not flags.nonfinite: optimizer.step(lr)      # over sync.params only
    sync.after_update()                             # "step taken"

As in Horovod's DistributedOptimizer, `synchronize()` is the one point where this rank's
`sync.params.grad` holds the global mean gradient and every rank knows the same `StepFlags`:
clipping or a skip decision fits between it and the update. Each rank checks its own gradient
for non-finite values *before* the sum (a sum is non-finite iff one of its terms is, barring
overflow): layer by layer as backward reports them (`on_grads_ready`), while each layer's
gradient is still in cache, and whatever backward did not report at the sync point. The flags
travel in the collective that sums the gradients, so agreeing on them costs no extra call.
Where the run stops on a non-finite gradient (train.nonfinite=stop, the default), the sync
leaves the check to the update instead (`optimizer_checks`; one process, the MPI allreduce,
shared memory on one node): the optimizer reads the summed gradient anyway, and its compiled
pass checks it in the same read (ddtrain.engine.kernels), so the check costs no pass of its
own. `after_update(nonfinite)` makes every rank agree on what the updates found (the same
whole sum on every rank of the allreduce; on one node the flags ride the node sync that
publishes the parts), and a non-finite step then stops the run after its update, which is
never saved (no checkpoint is written on that stop).

Every implementation also owns: where the model's buffers live (shared memory moves them),
the start-up broadcast of rank 0's parameters and buffers, optimizer-state gather/scatter for
checkpoints, whether ranks can hold different weights (fingerprint checks), sums over the global
batch for layers (BatchNorm) through the `BatchContext` it makes, its label, and a count of the
collectives it ran (`calls`: what the log and summary report, so a label is checked against
what ran).

Rules for every implementation: every rank constructs it at the same point (construction may be
collective) over the same parameter layout; every rank calls the step methods in the order above
the same number of times, also on a skipped step and with an empty slice of the batch.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ddtrain.data.order import rank_slice
from ddtrain.engine.context import BatchContext
from ddtrain.engine.kernels import nonfinite
from ddtrain.engine.params import FlatPart


@dataclass(frozen=True)
class StepFlags:
    """What the ranks agree on at each step's synchronisation point (sums over ranks).

    stop: the signal numbers of ranks asked to stop (SIGINT/SIGTERM), summed (0: go on);
    nonfinite: how many ranks' own gradients held a NaN or infinity.
    """

    stop: int = 0
    nonfinite: int = 0


class GradientSync(Protocol):
    label: str  # what the log, metrics.jsonl and summary.json say
    params: FlatPart  # the range of the flat vector this rank's optimizer updates
    weights_can_differ: bool  # whether ranks hold weights of their own (fingerprint checks apply)
    optimizer_checks: bool  # the update checks the gradient (step(lr, check=True)), the sync does not
    update_can_check: bool  # whether it may (`leave_check_to_optimizer`)
    on_grads_ready: Callable[[int], None] | None  # Sequential.backward's hook
    calls: Counter  # collectives run so far, by name
    batch_sum_seconds: float  # wall time inside cross-rank batch sums so far (the trainer's stats_sync)

    def broadcast_initial_state(self) -> None:
        """Rank 0's parameters and buffers on every rank (start, resume). Collective."""

    def batch_parts(self, global_batch: int) -> list[tuple[int, int]]:
        """This rank's rows [a, b) of the global batch, each computed on its own, in order."""

    def context(self, seed: int, step: int, offset: int, global_batch: int) -> BatchContext:
        """The BatchContext for the part starting at row `offset`."""

    def part_done(self) -> None:
        """After each part's backward (params.grad holds that part's gradient)."""

    def synchronize(self, flags: StepFlags) -> StepFlags:
        """Gradients become the global mean in `params.grad`; returns the flags over all ranks."""

    def after_update(self, nonfinite: int = 0) -> int:
        """After this rank's update (or a skipped step); `nonfinite`: what the update's own check
        found (0 where it was not asked). Returns that count agreed over ranks."""

    def full_optimizer_state(self, state: dict) -> dict:
        """The whole optimizer state from this rank's (for a checkpoint). Collective."""

    def optimizer_state_part(self, state: dict) -> dict:
        """This rank's share of a whole optimizer state (from a checkpoint)."""


class SyncBase:
    """What most implementations share: the whole vector, rank_slice parts, MPI-summed batch
    statistics, rank 0's state broadcast with Bcast. Subclasses define `synchronize` and `label`."""

    label = "?"
    optimizer_checks = False
    # Whether after_update can agree on what the updates found, so that the update may check
    # the gradient instead of this sync (every rank updates the same whole sum: True here).
    update_can_check = True

    def __init__(self, comm, model):
        self.comm, self.model = comm, model
        self.xp = model.backend.xp
        flat = model.params
        self.params = flat.part(0, flat.size)
        self.weights_can_differ = comm.size > 1
        self.calls: Counter = Counter()
        self.batch_sum_seconds = 0.0
        self.on_grads_ready = self._check_ready
        self._unchecked = flat.size  # grad[_unchecked:] is checked this step
        self._bad = 0

    def leave_check_to_optimizer(self) -> None:
        """Check no gradient here: the update does (`optimizer_checks`; see the module docstring).
        Only for a sync whose `after_update` agrees on what the updates found (`update_can_check`)."""
        self.optimizer_checks = True
        self._unchecked = 0  # nothing left to check, every step
        if self.on_grads_ready == self._check_ready:
            self.on_grads_ready = None

    # -- the local non-finite check ---------------------------------------------------
    def _check_ready(self, offset: int) -> None:
        """Backward finished grad[offset:]: check the part not checked yet (it is in cache now)."""
        if offset < self._unchecked:
            self._bad |= nonfinite(self.xp, self.model.params.grad[offset:self._unchecked])
            self._unchecked = offset

    def local_nonfinite(self) -> int:
        """1 if this rank's own gradient of this step is non-finite (checks what backward did not
        report); resets the check for the next step."""
        if self.optimizer_checks:
            return 0
        self._check_ready(0)
        bad, self._bad, self._unchecked = self._bad, 0, self.model.params.size
        return bad

    # -- start-up ---------------------------------------------------------------------
    def broadcast_initial_state(self) -> None:
        self.comm.Bcast(self.model.params.data, root=0)
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        for buf in self.model.buffers.values():
            self.comm.Bcast(buf, root=0)

    # -- one step -------------------------------------------------------------------
    def batch_parts(self, global_batch: int) -> list[tuple[int, int]]:
        return [rank_slice(global_batch, self.comm.rank, self.comm.size)]

    def context(self, seed: int, step: int, offset: int, global_batch: int) -> BatchContext:
        return BatchContext(seed, step, offset, global_batch, self.batch_sum)

    def batch_sum(self, key: str, local: np.ndarray, on_global=None) -> np.ndarray:
        """Statistics of the global batch: an MPI Allreduce of every rank's sums."""
        t = time.perf_counter()
        total = local.astype(np.float64)  # a copy, on the array's own device
        self.comm.Allreduce(total)
        self.batch_sum_seconds += time.perf_counter() - t
        self.calls["Allreduce (batch statistics)"] += 1
        if on_global is not None:
            on_global(total)
        return total

    def part_done(self) -> None:
        return None

    def after_update(self, nonfinite: int = 0) -> int:
        return nonfinite  # every rank updated from the same whole sum: all found the same

    # -- checkpoints ----------------------------------------------------------------
    def full_optimizer_state(self, state: dict) -> dict:
        return state

    def optimizer_state_part(self, state: dict) -> dict:
        return state
