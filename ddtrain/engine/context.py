"""What a layer knows about the batch it is running on: the per-step batch context.

The trainer hands every layer one `BatchContext` before each training forward
(`Sequential.set_batch_context`). It says where this rank's samples sit in the global batch
(Dropout draws its masks from that, so they do not depend on the rank count) and offers
**sums over the global batch** to layers that need statistics of the whole batch
(BatchNorm's per-channel sums): `batch_sum`.

Who implements `batch_sum` is the gradient-sync object of the run (ddtrain.parallel.sync):
one process returns the local sums; the MPI paths Allreduce them, so every rank normalises
with the statistics of the global batch; the deterministic (fixed micro-shard) path returns
the micro-shard's own sums (ghost batch norm: the statistics of each fixed micro-shard) and
delivers the global totals, combined in a fixed order, after the step.

Rules: every rank calls `batch_sum` the same number of times with the same shapes in the same
order (it may be a collective), also a rank whose slice is empty (it passes zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


class BatchSums(Protocol):
    def __call__(self, key: str, local: np.ndarray,
                 on_global: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """Sums of `local` over the samples that share this batch's normalisation.

        key: a name unique in the model for this reduction (e.g. "3.forward"); local: a small
        float64 host array (this rank's sums over its samples); on_global: called once per
        step with the sums over the whole global batch (for running statistics), right away
        or after the step. Returns the sums to normalise with (do not keep the array)."""


def local_sums(key: str, local: np.ndarray, on_global=None) -> np.ndarray:
    """The one-process (and gradcheck) `batch_sum`: this batch is the global batch."""
    if on_global is not None:
        on_global(local)
    return local


@dataclass(frozen=True)
class BatchContext:
    """Where this rank's rows sit in the global batch, and how to sum over that batch.

    seed: the run's seed; step: optimizer steps done; offset: index of this rank's first
    sample in the global batch; global_batch: its size; batch_sum: see `BatchSums`.
    """

    seed: int
    step: int
    offset: int
    global_batch: int
    batch_sum: BatchSums = local_sums


def single_batch(seed: int, step: int, n: int) -> BatchContext:
    """The context of a batch of n samples that is the whole global batch (one process)."""
    return BatchContext(int(seed), int(step), 0, int(n))
