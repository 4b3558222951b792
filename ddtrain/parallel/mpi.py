"""MPICommunicator: the Communicator protocol (ddtrain/parallel/comm.py) over mpi4py.

This is the only ddtrain module that imports mpi4py; `ddtrain.parallel.world()` imports it
only when an MPI launcher started the process with more than one rank. Each method is the MPI
call it is named after, on a private duplicate of COMM_WORLD, and nothing else: `Allreduce`
is MPI_Allreduce (in place, SUM), whatever the buffer's size. Shared-memory algorithms are
gradient-sync implementations of their own (ddtrain/parallel/sync/), over `node()`.

Rules and failure modes (every rank relies on them):
  * Arrays move through buffer methods (``Allreduce`` with MPI.IN_PLACE, ``Iallreduce``,
    ``Allreduce_init``, ``Bcast``), never pickled; ``*_obj`` methods pickle small Python values.
  * MPI is initialised with thread level MULTIPLE because a watchdog thread per rank
    (ddtrain/parallel/watchdog.py) exchanges heartbeats on its own duplicated communicator
    while the main thread sits in a collective. It names a rank that stopped responding, or a
    collective that outlived its deadline, and aborts the job: no rank waits forever.
  * Every blocking collective runs inside `_watched(name)`, which records its name and start
    time for the watchdog's deadline check (two attribute writes, no lock).
    ``set_step(step)`` (the trainer calls it each step) also feeds the step times the default
    deadline is derived from.
  * At exit, ranks meet in a Barrier (still watched), stop their watchdogs, then MPI finalises.
  * CuPy arrays go through ddtrain.parallel.cuda.DeviceStaging (direct with a CUDA-aware MPI,
    else pinned host copies).
The exception hooks that turn one rank's uncaught exception into an MPI Abort of the job are
installed by `ddtrain.parallel.world()`, not here.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
from contextlib import contextmanager

import numpy as np

import mpi4py

# Must be set before MPI_Init (importing mpi4py.MPI initialises MPI).
mpi4py.rc.thread_level = "multiple"
from ddtrain.parallel.mpich_defaults import apply as _apply_mpich_defaults  # noqa: E402

_apply_mpich_defaults(os.environ)
from mpi4py import MPI  # noqa: E402

from ddtrain.parallel.cuda import DeviceStaging  # noqa: E402
from ddtrain.parallel.watchdog import STEP_RING, Watchdog, collective_deadline, heartbeat_timeout  # noqa: E402

OUTPUT_GRACE = 0.3  # seconds between printing the reason and MPI_Abort
ABORT_GRACE = 5.0  # seconds the launcher gets to end the job after MPI_Abort before we exit


def _reduce_pair(a, b, op: str):
    """a op b for numbers, elementwise for tuples/lists; max/min propagate NaN (order-free)."""
    if isinstance(a, (tuple, list)):
        return type(a)(_reduce_pair(x, y, op) for x, y in zip(a, b, strict=True))
    if op == "sum":
        return a + b
    if a != a or b != b:  # NaN
        return a if a != a else b
    return max(a, b) if op == "max" else min(a, b)


class _Request:
    """A started Iallreduce. ``Wait()`` is watched by the deadline like a blocking collective."""

    __slots__ = ("_owner", "_req", "_after")

    def __init__(self, owner: "MPICommunicator", req, after=None):
        self._owner, self._req, self._after = owner, req, after

    def Wait(self) -> None:
        with self._owner._watched("Iallreduce"):
            self._req.Wait()
        self._done()

    def Test(self) -> bool:
        if self._req.Test():
            self._done()
            return True
        return False

    def _done(self) -> None:
        if self._after is not None:
            self._after()
            self._after = None


class _Persistent:
    """A persistent MPI_Allreduce (MPI_Allreduce_init, MPI-4) over one buffer: MPI chooses the
    algorithm and sets up its schedule once, and each ``Start()`` reruns it on what the buffer
    holds then. ``Wait()`` is watched by the deadline like a blocking collective."""

    __slots__ = ("_owner", "_req", "_before", "_after", "_active")

    def __init__(self, owner: "MPICommunicator", req, before=None, after=None):
        self._owner, self._req, self._before, self._after = owner, req, before, after
        self._active = False

    def Start(self) -> None:
        if self._before is not None:
            self._before()
        self._req.Start()
        self._active = True

    def Wait(self) -> None:
        if self._active:
            with self._owner._watched("Allreduce (persistent)"):
                self._req.Wait()
            self._done()

    def Test(self) -> bool:
        if self._active and self._req.Test():
            self._done()
        return not self._active

    def _done(self) -> None:
        self._active = False
        if self._after is not None:
            self._after()

    def free(self) -> None:
        """Release the request (at close; an active one is left to MPI_Finalize)."""
        if not self._active:
            self._req.Free()


class _IallreduceEachStart:
    """MPI_Allreduce_init's stand-in for an MPI library before MPI-4: an Iallreduce per Start."""

    def __init__(self, comm, buf):
        self._comm, self._buf, self._req = comm, buf, MPI.REQUEST_NULL

    def Start(self) -> None:
        self._req = self._comm.Iallreduce(MPI.IN_PLACE, self._buf, op=MPI.SUM)

    def Wait(self) -> None:
        self._req.Wait()

    def Test(self) -> bool:
        return self._req.Test()

    def Free(self) -> None:
        return None


def persistent_collectives() -> bool:
    """Whether the MPI library has MPI-4's persistent collectives (MPI_Allreduce_init)."""
    return MPI.Get_version() >= (4, 0)


class MPICommunicator:
    """The Communicator protocol over MPI.COMM_WORLD (see the module docstring for the rules).

    timeout: deadline (s) of every blocking collective (``--timeout``); None derives it from
        the step times. Heartbeats time out after min(timeout / 2, 10 s). See
        ddtrain.parallel.watchdog.collective_deadline and heartbeat_timeout.
    watchdog: False runs without the watchdog thread (benchmarks, tests of the bare calls).
    heartbeat_s: seconds between heartbeats.
    """

    def __init__(self, timeout: float | None = None, watchdog: bool = True, heartbeat_s: float = 0.5):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        world = MPI.COMM_WORLD
        self._comm = world.Dup()  # our collectives never match a library's on COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        # Asked on every rank (a collective no rank may skip): the shared-memory sync needs
        # the same number of ranks on every node (one inter-node communicator per local rank).
        sizes = set(self._comm.allgather(self.local_size))
        self.ranks_per_node = self.local_size if len(sizes) == 1 else None
        self.hostname = socket.gethostname()
        self.timeout = timeout
        self.step = -1
        self._op = ""  # the blocking collective in progress, for the watchdog
        self._op_started = 0.0  # its monotonic start time; 0.0 when none is in progress
        self._step_seconds = [0.0] * STEP_RING
        self._n_timed = 0
        self._last_step_at = 0.0
        self._device = DeviceStaging(MPI.__file__)
        self._closed = False
        self._node = None
        self._persistent: list[_Persistent] = []  # freed at close, before the communicators
        self.watchdog: Watchdog | None = None
        if watchdog and self.size > 1:
            if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                print(f"rank {self.rank}: the MPI library gives no THREAD_MULTIPLE support; running "
                      f"without the watchdog (a stalled rank can hang the job)", file=sys.stderr)
            else:
                self.watchdog = Watchdog(world.Dup(), self, heartbeat_timeout(timeout), heartbeat_s)
                self.watchdog.start()
        atexit.register(self.close)

    # -------------------------------------------------------------- step bookkeeping
    @contextmanager
    def _watched(self, name: str):
        """Around a blocking call: what the watchdog's collective deadline reads."""
        self._op, self._op_started = name, time.monotonic()
        try:
            yield
        finally:
            self._op_started = 0.0

    def set_step(self, step: int) -> None:
        """Called by the trainer at the start of every step: names the step, times the last one."""
        now = time.monotonic()
        if self._last_step_at:
            self._step_seconds[self._n_timed % STEP_RING] = now - self._last_step_at
            self._n_timed += 1
        self._last_step_at = now
        self.step = step

    def collective_deadline(self) -> float:
        """Seconds a blocking collective may take now (read by the watchdog, not the hot loop)."""
        n = min(self._n_timed, STEP_RING)
        return collective_deadline(self.timeout, self._step_seconds[:n], closing=self._closed)

    # -------------------------------------------------------------- arrays (buffers)
    def Allreduce(self, buf) -> None:
        """MPI_Allreduce(MPI_IN_PLACE, buf, SUM) (any dtype MPI knows; numpy or CuPy)."""
        with self._watched("Allreduce"):
            self._device.call(buf, lambda b: self._comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM))

    def Iallreduce(self, buf) -> _Request:
        """MPI_Iallreduce(MPI_IN_PLACE, buf, SUM); the sum is in `buf` after ``Wait()`` (or a
        true ``Test()``). `buf` must not be read or written until then."""
        req, after = self._device.start(buf, lambda b: self._comm.Iallreduce(MPI.IN_PLACE, b, op=MPI.SUM))
        return _Request(self, req, after)

    def Allreduce_init(self, buf) -> _Persistent:
        """MPI_Allreduce_init(MPI_IN_PLACE, buf, SUM): a persistent sum of `buf` (see
        comm.Communicator.Allreduce_init). For a buffer summed every step, such as the gradient:
        MPI's algorithm choice and schedule are made once, not at every call (one persistent
        request costs 0.97-0.99x the blocking call on 2.68 MB; two for its halves 1.00-1.02x
        against 1.05-1.08x for two Iallreduce: 2 ranks on the 2-core EPYC, MPICH 5.0.2).
        With an MPI library before MPI-4 each Start() is an Iallreduce."""
        return self._persistent_sum(self._comm, buf)

    def _persistent_sum(self, comm, buf) -> _Persistent:
        """A persistent in-place SUM of `buf` over `comm` (this communicator's, or the node's
        cross-node one), staged through host memory where the MPI library cannot read `buf`;
        freed at close, before any communicator."""
        b, before, after = self._device.bind(buf)
        if persistent_collectives():
            req = comm.Allreduce_init(MPI.IN_PLACE, b, op=MPI.SUM)
        else:
            req = _IallreduceEachStart(comm, b)
        request = _Persistent(self, req, before, after)
        self._persistent.append(request)
        return request

    def Bcast(self, buf, root: int = 0) -> None:
        """MPI_Bcast: root's `buf` into every rank's `buf`."""
        with self._watched("Bcast"):
            self._device.call(buf, lambda b: self._comm.Bcast(b, root=root))

    # -------------------------------------------------------------- small Python values
    def bcast_obj(self, obj, root: int = 0):
        with self._watched("bcast_obj"):
            return self._comm.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        with self._watched("allgather_obj"):
            return self._comm.allgather(obj)

    def allreduce_obj(self, obj, op: str = "sum"):
        """op: "sum", "max" or "min" of numbers or tuples of them (elementwise), reduced in rank
        order on every rank, so the result is the same on all ranks (max/min propagate NaN)."""
        if op not in ("sum", "max", "min"):
            raise ValueError(f"allreduce_obj op must be sum, max or min, not {op!r}")
        values = self.allgather_obj(obj)
        result = values[0]
        for v in values[1:]:
            result = _reduce_pair(result, v, op)
        return result

    def Barrier(self) -> None:
        with self._watched("Barrier"):
            self._comm.Barrier()

    def Abort(self, code: int = 1) -> None:
        """End every rank of the job with exit status `code` (never returns)."""
        sys.stdout.flush()
        sys.stderr.flush()
        # hydra's proxy may act on the abort before forwarding what this rank just printed
        # (the reason would be lost): give it a moment.
        time.sleep(OUTPUT_GRACE)
        if MPI.Is_finalized():  # too late for MPI: this process's exit status must do
            os._exit(code)
        MPI.COMM_WORLD.Abort(code)
        # MPICH's MPI_Abort returns once it has told the launcher, which then kills every rank;
        # this rank must not run on meanwhile (nor print a second failure).
        time.sleep(ABORT_GRACE)
        os._exit(code)

    # -------------------------------------------------------------- the node
    def node(self):
        """This rank's node: shared windows over the node's ranks and the inter-node
        communicator of its local rank (ddtrain.parallel.mpi_node.MPINode). Created on first
        call, which is collective: every rank must make it at the same point."""
        if self._node is None:
            from ddtrain.parallel.mpi_node import MPINode

            self._node = MPINode(self)
        return self._node

    # -------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Meet the other ranks, stop the watchdog, free communicators (idempotent; at exit).

        The Barrier comes first, while the watchdog still runs, so a rank that finishes early
        is not mistaken for a stopped one and a rank that never arrives is still caught.
        """
        if self._closed or MPI.Is_finalized():
            return
        self._closed = True
        if self.watchdog is not None:
            self.Barrier()
            self.watchdog.stop()
            self.watchdog = None
        for request in self._persistent:  # before the communicators they run on
            request.free()
        self._persistent.clear()
        if self._node is not None:
            self._node.free()
            self._node = None
        self._local.Free()
        self._comm.Free()
