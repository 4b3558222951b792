"""`--deterministic`: fixed micro-shards summed in int64 fixed point, bitwise the same for any rank count.

Float addition is not associative, so a float sum depends on how the batch was split over
ranks. Instead the global batch is cut into `n_shards` fixed micro-shards (the same cut for
any number of ranks, ddtrain.data.order.micro_shards); each rank computes its micro-shards'
float32 gradients one after another, each alone with the same shapes wherever it runs, then

    e = fixed_point_exponent(max |g| over ALL micro-shards, n_shards)   # agreed by all ranks
    acc(int64) = sum over my micro-shards of rint(g * 2**e)              # exact integers
    MPI_Allreduce SUM of acc (exact, so any order and any split give the same integers)
    grad = acc * 2**-e                                                   # the same float32 bits

e is chosen so that n_shards quantised values cannot overflow int64 (2 bits of headroom below
2**63), which keeps about 62 - log2(n_shards) bits for the largest entry: far finer than
float32. The weights are then bitwise identical for 1, 2, 3... ranks.

Batch statistics (BatchNorm) are those of each fixed micro-shard (ghost batch norm): a
micro-shard is computed alone, before the others exist. The running statistics are updated
from the global batch's sums, added micro-shard by micro-shard in micro-shard order on every
rank after the step, so they too are bitwise the same for any rank count.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ddtrain.data.order import micro_shards, rank_micro_shards
from ddtrain.engine.context import BatchContext
from ddtrain.errors import ConfigError, everywhere
from ddtrain.engine.kernels import nonfinite
from ddtrain.parallel.sync.base import StepFlags, SyncBase

INT_BITS = 62  # |sum| <= 2**62 < 2**63: one bit of margin for rounding


def fixed_point_exponent(max_abs: float, n_shards: int) -> int:
    """e such that rint(g * 2**e) summed over `n_shards` values with |g| <= max_abs fits int64.

    max_abs < 2**k (frexp), so each |rint(g 2**e)| <= 2**(k+e) and the sum of n_shards of
    them <= 2**(k + e + ceil(log2 n_shards)) = 2**INT_BITS. max_abs == 0 gives 0.
    Raises ValueError for a non-finite max_abs (check finiteness first).
    """
    if not math.isfinite(max_abs):
        raise ValueError(f"fixed-point gradients need finite values, max |g| is {max_abs}")
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, not {n_shards}")
    if max_abs == 0:
        return 0
    _, k = math.frexp(max_abs)
    return INT_BITS - k - (n_shards - 1).bit_length()


def quantize_add(int_acc, grad, scale_exp: int) -> None:
    """int_acc += rint(grad * 2**scale_exp), exactly.

    int_acc: int64 (P,); grad: float32 (P,) (numpy or CuPy, like int_acc). The float64
    product is exact (a power-of-two scaling of a float32), rint rounds half to even, and the
    result is converted to int64 before the (exact) integer addition.
    """
    q = grad.astype("float64")
    q *= 2.0 ** scale_exp
    q.round(out=q)
    int_acc += q.astype("int64")


def dequantize(int_acc, scale_exp: int, out) -> None:
    """out[...] = int_acc * 2**-scale_exp, rounded to out's dtype (float32 (P,))."""
    scaled = int_acc.astype("float64")
    scaled *= 2.0 ** -scale_exp
    out[...] = scaled


class FixedPointAllreduce(SyncBase):
    """Fixed micro-shards, an int64 MPI_Allreduce: bitwise the same weights for any rank count.

    Rules: every rank builds it with the same n_shards (dist.micro_shards, at least the number
    of ranks, so every rank computes a micro-shard); the batch parts it gives are micro-shards,
    each computed alone (`part_done` keeps a copy of each one's gradient). Per step it runs
    one allgather of small values (max |g|, the flags, batch statistics) and one int64
    persistent MPI_Allreduce of the gradient (MPI_Allreduce_init once). Failure modes: as the
    plain allreduce; a non-finite gradient anywhere sets `nonfinite` on every rank (fixed
    point cannot represent it).
    """

    label = "MPI allreduce, int64 fixed point (deterministic)"
    update_can_check = False  # a non-finite value has no fixed point: checked before the sum

    def __init__(self, comm, model, n_shards: int):
        super().__init__(comm, model)
        if n_shards < comm.size:
            raise everywhere(ConfigError(f"dist.micro_shards ({n_shards}) must be at least the number of ranks "
                              f"({comm.size}) in deterministic mode: raise it (e.g. --set "
                              f"dist.micro_shards={comm.size})"))
        self.n_shards = int(n_shards)
        self._grads: list = []  # a copy of each micro-shard's gradient this step
        self._n = 0
        self._max = 0.0
        self._bad = 0
        # The int64 sum's buffer never moves: a persistent allreduce over it (made once,
        # collectively, here), started every step.
        self._acc = self.xp.zeros(self.params.grad.size, dtype="int64")
        self._sum = comm.Allreduce_init(self._acc)
        self._stats: dict = defaultdict(list)  # key -> [(offset, sums)] of my micro-shards
        self._on_global: dict = {}  # key -> the layer's running-statistics update (kept)
        self.on_grads_ready = None  # each micro-shard's gradient is checked whole in part_done

    def batch_parts(self, global_batch: int) -> list[tuple[int, int]]:
        shards = micro_shards(global_batch, self.n_shards)
        mine = rank_micro_shards(len(shards), self.comm.rank, self.comm.size)
        return [shards[i] for i in mine if shards[i][1] > shards[i][0]]  # empty ones add nothing

    def context(self, seed: int, step: int, offset: int, global_batch: int) -> BatchContext:
        def ghost_sum(key, local, on_global=None):
            if on_global is not None:  # only running statistics need the global sums
                self._stats[key].append((offset, np.asarray(self.model.backend.to_host(local), dtype=np.float64)))
                self._on_global[key] = on_global
            return local

        return BatchContext(seed, step, offset, global_batch, ghost_sum)

    def part_done(self) -> None:
        g = self.params.grad
        if self._n == len(self._grads):
            self._grads.append(g.copy())
        else:
            self._grads[self._n][...] = g
        self._n += 1
        bad = nonfinite(self.xp, g)
        self._bad |= bad
        if not bad and g.size:
            self._max = max(self._max, float(abs(g).max()))

    def synchronize(self, flags: StepFlags) -> StepFlags:
        mine = (self._max, self._bad, flags.stop, dict(self._stats))
        everyone = self.comm.allgather_obj(mine)
        self.calls["allgather (max |g|, flags, batch statistics)"] += 1
        grads, self._n, self._max, self._bad = self._grads[:self._n], 0, 0.0, 0
        self._stats.clear()
        agreed = StepFlags(stop=sum(e[2] for e in everyone), nonfinite=sum(e[1] for e in everyone))
        self._update_running_statistics([e[3] for e in everyone])
        if agreed.nonfinite:
            return agreed
        e = fixed_point_exponent(max(m for m, *_ in everyone), self.n_shards)
        grad, acc = self.params.grad, self._acc
        acc.fill(0)
        for g in grads:
            quantize_add(acc, g, e)
        self._sum.Start()
        self._sum.Wait()
        self.calls["persistent Allreduce (int64)"] += 1
        dequantize(acc, e, out=grad)
        return agreed

    def _update_running_statistics(self, per_rank: list[dict]) -> None:
        """Every rank adds every micro-shard's sums in micro-shard order: the same bits anywhere."""
        for key in sorted(self._on_global):
            parts = sorted((p for stats in per_rank for p in stats.get(key, [])), key=lambda p: p[0])
            if parts:
                total = parts[0][1].copy()
                for _, sums in parts[1:]:
                    total += sums
                self._on_global[key](total)
