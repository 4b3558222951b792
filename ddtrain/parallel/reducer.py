"""The gradient reducer: sums the flat gradient buffer over ranks, the trainer's one call per step.

Two modes:

"sum" (default). Every rank's gradient is already scaled by 1/global_batch (the loss does
it), so a plain SUM over ranks gives the global mean. With ``overlap=True`` the buffer is cut
into buckets of ~bucket_mb (contiguous ranges of whole parameter tensors, built from the END
of the buffer backwards, because backward produces the last layer's gradients first);
``Sequential.backward`` calls ``grads_ready(offset)`` after each layer and every bucket that
is now complete starts an Iallreduce while backward carries on with earlier layers.
``finish()`` waits for the rest. With ``overlap=False`` finish() does one blocking Allreduce
of the whole buffer.

"fixed_point" (``--deterministic``). Float addition is not associative, so a float sum
depends on how the batch was split over ranks. Instead, the global batch is cut into
`n_shards` fixed micro-shards (the same cut for any number of ranks); each micro-shard's
float32 gradient is computed alone, then

    e = fixed_point_exponent(max |g| over ALL micro-shards, n_shards)   # allreduce MAX
    acc(int64) = sum over micro-shards of rint(g * 2**e)                  # exact integers
    Allreduce SUM of acc (exact, so any order and any split give the same integers)
    grad = acc * 2**-e                                                    # the same float32 bits

e is chosen so that n_shards quantised values cannot overflow int64 (2 bits of headroom
below 2**63), which keeps about 62 - log2(n_shards) bits for the largest entry: far finer
than float32. The weights are then bitwise identical for 1, 2, 3... ranks. Per step:

    reducer = GradientReducer(comm, params, mode="fixed_point")
    for each of my micro-shards:
        params.zero_grad(); forward + backward on it (loss scaled by 1/global_batch)
        reducer.add_shard(params.grad)           # copies it
    reducer.finish()                              # params.grad = the global sum

(The helpers `fixed_point_exponent`, `quantize_add` and `dequantize` are public for a
caller that keeps the shard gradients itself.) A non-finite gradient anywhere makes every
rank's params.grad NaN, as a float sum would, so the trainer's non-finite check sees it.

Rules: every rank builds the reducer over the same parameter layout and calls
grads_ready/add_shard/finish in the same pattern (MPI matches collectives by order);
params.grad must not be touched between the first grads_ready() of a step and finish()
(Iallreduce is writing into it). With one process every call is free.
"""

from __future__ import annotations

import math
import time

from ddtrain.engine.params import FlatParams

MODES = ("sum", "fixed_point")
INT_BITS = 62  # |sum| <= 2**62 < 2**63: one bit of margin for rounding


# ------------------------------------------------------------------------------ buckets
def make_buckets(slots, bucket_bytes: float, itemsize: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of whole slots, the last slots first.

    Each bucket holds at least `bucket_bytes` (except the one at the front of the buffer,
    which takes what is left); a slot larger than a bucket is a bucket of its own.
    slots: objects with .start and .stop (FlatParams.slots), in buffer order.
    """
    buckets: list[tuple[int, int]] = []
    stop = None
    start = 0
    for slot in reversed([s for s in slots if s.stop > s.start]):
        if stop is None:
            stop = slot.stop
        start = slot.start
        if (stop - start) * itemsize >= bucket_bytes:
            buckets.append((start, stop))
            stop = None
    if stop is not None:
        buckets.append((start, stop))
    return buckets


# ------------------------------------------------------------------------------ fixed point
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


# ------------------------------------------------------------------------------ the reducer
class GradientReducer:
    """Sums ``params.grad`` over ranks each step; see the module docstring for modes and rules.

    comm: a Communicator; params: the model's FlatParams (same layout on every rank);
    bucket_mb: bucket size for overlap; overlap: start bucket allreduces during backward;
    mode: "sum" or "fixed_point".
    """

    def __init__(self, comm, params: FlatParams, bucket_mb: float = 1.0, overlap: bool = True,
                 mode: str = "sum"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, not {bucket_mb}")
        self.comm, self.params, self.mode = comm, params, mode
        self.overlap = overlap and mode == "sum"
        grad = params.grad
        self.buckets = make_buckets(params.slots, bucket_mb * 2**20, grad.dtype.itemsize)
        self._views = [grad[a:b] for a, b in self.buckets]
        self._next = 0  # buckets[:_next] have been started this step
        self._requests: list = []
        self._last_offset = None
        # fixed_point: the micro-shard gradients this rank added this step, and the int sum.
        self._shards = None
        self._n_shards = 0
        self._int_acc = None

    @property
    def pending(self) -> bool:
        """True between the first bucket started in a step and finish()."""
        return bool(self._requests)

    # ---------------------------------------------------------------- mode "sum"
    def grads_ready(self, offset: int) -> None:
        """Every gradient entry at flat index >= offset is final for this step: start the
        Iallreduce of each bucket now complete, in bucket order (last bucket first)."""
        if not self.overlap or self.comm.size == 1:
            return
        if self._last_offset is not None and offset > self._last_offset:
            raise RuntimeError(f"grads_ready({offset}) after grads_ready({self._last_offset}) in the same "
                               f"step: call finish() at the end of every step")
        self._last_offset = offset
        for req in self._requests:  # MPI progresses a nonblocking collective only inside calls
            req.Test()
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= offset:
            self._requests.append(self.comm.Iallreduce(self._views[self._next]))
            self._next += 1

    def finish(self) -> float:
        """Complete this step's reduction; returns the seconds spent waiting here (the part of
        the communication backward did not hide). params.grad then holds the global sum."""
        if self.comm.size == 1 and self.mode == "sum":
            return 0.0
        t0 = time.perf_counter()
        if self.mode == "fixed_point":
            self._finish_fixed_point()
        elif not self.overlap:
            self.comm.Allreduce(self.params.grad)
        else:
            while self._next < len(self.buckets):  # buckets backward did not report
                self._requests.append(self.comm.Iallreduce(self._views[self._next]))
                self._next += 1
            for req in self._requests:
                req.Wait()
            self._requests.clear()
            self._next = 0
            self._last_offset = None
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- mode "fixed_point"
    def add_shard(self, grad) -> None:
        """Keep a copy of one micro-shard's float32 gradient (P,) for this step's finish()."""
        if self.mode != "fixed_point":
            raise RuntimeError("add_shard() is for mode='fixed_point'")
        if self._shards is None or self._n_shards == len(self._shards):
            grown = [None] * max(2 * self._n_shards, 4)
            if self._shards is not None:
                grown[:self._n_shards] = self._shards
            self._shards = grown
        slot = self._shards[self._n_shards]
        if slot is None:
            slot = self._shards[self._n_shards] = grad.copy()
        else:
            slot[...] = grad
        self._n_shards += 1

    def _finish_fixed_point(self) -> None:
        mine = self._shards[:self._n_shards] if self._n_shards else []
        local_max = max((float(abs(g).max()) for g in mine), default=0.0)
        if math.isnan(local_max):
            local_max = math.inf
        stats = self.comm.allgather_obj((local_max, self._n_shards))
        global_max = max(m for m, _ in stats)
        n_shards = sum(n for _, n in stats)
        self._n_shards = 0
        grad = self.params.grad
        if not math.isfinite(global_max):
            grad.fill(math.nan)
            return
        e = fixed_point_exponent(global_max, max(n_shards, 1))
        if self._int_acc is None:
            self._int_acc = grad.astype("int64")
        acc = self._int_acc
        acc.fill(0)
        for g in mine:
            quantize_add(acc, g, e)
        self.comm.Allreduce(acc)
        dequantize(acc, e, out=grad)
