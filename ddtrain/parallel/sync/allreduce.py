"""The MPI allreduce of the flat gradient: the path between nodes, for GPUs, and the reference.

Every rank's gradient is already scaled by 1/global_batch (the loss does it), so a plain SUM
over ranks is the global mean. The gradient lives in a "wire" buffer with a small header in
front of it:

    wire = [ header (HEADER elements: stop, nonfinite, padding) | gradient (P) ]

so the step's flags are summed by the same MPI_Allreduce as the gradient: one collective a
step. The wire never moves, so its allreduce is a persistent one (MPI_Allreduce_init, made
once; each step starts it again), which spares MPI its per-call set-up. With `overlap`, the
wire is cut into buckets of ~bucket_mb (contiguous ranges of whole parameter tensors, built
from the end, since backward finishes the last layer first), each with its persistent
allreduce; `Sequential.backward` reports each finished layer (`on_grads_ready`) and every
bucket now complete is checked for non-finite values and started while backward carries on.
The front bucket holds the header, so it is started last, in `synchronize()`, once the flags
are known; then every request is waited for.
"""

from __future__ import annotations

from ddtrain.parallel.sync.base import StepFlags, SyncBase

HEADER = 16  # elements: the flags, padded to 64 bytes so the gradient stays cache-line aligned


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


class MPIAllreduce(SyncBase):
    """One persistent MPI_Allreduce of [flags | gradient] per step, or one per bucket, started
    as backward finishes each (`overlap`).

    Rules: every rank builds it over the same parameter layout (it moves the model's gradient
    into its wire buffer, so build the optimizer after it) and calls the step methods in the
    interface's order; params.grad must not be touched between the first bucket started and
    `synchronize()` returning (MPI is writing into it). Failure modes: a rank that never reaches
    the collective is named by the watchdog's deadline; ranks whose layouts differ are refused
    at start (the trainer compares layouts before the first collective).
    Overlap on a node with no spare core helps little: MPICH progresses a nonblocking call
    only inside MPI calls.
    """

    def __init__(self, comm, model, overlap: bool = False, bucket_mb: float = 1.0):
        super().__init__(comm, model)
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, not {bucket_mb}")
        flat = model.params
        self.wire = self.xp.zeros(HEADER + flat.size, dtype=flat.data.dtype)
        model.use_buffers(flat.data, self.wire[HEADER:], copy_data=False)
        self.params = flat.part(0, flat.size)
        self.header = self.wire[:HEADER]
        self.overlap = bool(overlap) and flat.size > 0
        self.label = "MPI allreduce, " + ("bucketed, overlapped with backward" if overlap else "blocking")
        if self.overlap:
            buckets = make_buckets(flat.slots, bucket_mb * 2**20, flat.data.dtype.itemsize)
            # wire indices; the front bucket (the last one) takes the header too
            self.buckets = [(a + HEADER, b + HEADER) for a, b in buckets]
            if self.buckets:
                self.buckets[-1] = (0, self.buckets[-1][1])
            # every rank makes them in the same order (bucket order), as it starts them
            self._requests = [comm.Allreduce_init(self.wire[a:b]) for a, b in self.buckets]
            self._next = 0
            self.on_grads_ready = self._grads_ready
        else:
            self._whole = comm.Allreduce_init(self.wire)

    # -- overlap --------------------------------------------------------------------
    def _start(self, i: int) -> None:
        self._requests[i].Start()
        self.calls["persistent Allreduce of a bucket"] += 1

    def _start_complete(self, offset: int) -> None:
        """Start every bucket whose gradient is final (wire index >= offset + HEADER), last first,
        each checked for non-finite values before it leaves; never the front one (it carries
        the flags, known only once the whole gradient is checked)."""
        last = len(self.buckets) - 1
        while self._next < last and self.buckets[self._next][0] >= offset + HEADER:
            self._check_ready(self.buckets[self._next][0] - HEADER)
            self._start(self._next)
            self._next += 1

    def _grads_ready(self, offset: int) -> None:
        """Backward finished grad[offset:]: start the buckets now complete."""
        for req in self._requests[:self._next]:  # MPI progresses a collective only inside calls
            req.Test()
        self._start_complete(offset)

    # -- the synchronisation point ---------------------------------------------------
    def synchronize(self, flags: StepFlags) -> StepFlags:
        h = self.header
        if not self.overlap:
            h[0], h[1] = flags.stop, self.local_nonfinite()
            self._whole.Start()
            self._whole.Wait()
            self.calls["persistent Allreduce"] += 1
        else:
            self._start_complete(0)  # buckets backward did not report
            h[0], h[1] = flags.stop, self.local_nonfinite()
            self._start(len(self.buckets) - 1)
            for req in self._requests:
                req.Wait()
            self._next = 0
        stop, bad = h[:2].tolist()  # one small read (a device sync on a GPU)
        return StepFlags(stop=int(stop), nonfinite=int(bad))
