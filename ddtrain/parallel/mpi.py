"""MPICommunicator: the Communicator protocol (ddtrain/parallel/comm.py) over mpi4py.

This is the only ddtrain module that imports mpi4py; `ddtrain.parallel.world()` imports it only
when an MPI launcher started the process with more than one rank.

Rules and failure modes (every rank relies on them):
  * Arrays move through buffer methods (``Allreduce`` with MPI.IN_PLACE, ``Iallreduce``,
    ``Bcast``), never pickled; ``*_obj`` methods pickle small Python values.
  * MPI is initialised with thread level MULTIPLE because a watchdog thread per rank
    (ddtrain/parallel/watchdog.py) exchanges heartbeats on its own duplicated communicator while
    the main thread sits in a collective. It names a rank that stopped responding, or a
    collective that outlived its deadline, and aborts the job: no rank waits forever.
  * Every blocking collective records its name and start time in two attributes (no lock):
    that is what the watchdog's deadline check reads. ``set_step(step)`` (the trainer calls it
    each step) is a few attribute writes; it also feeds the step times the default deadline
    is derived from.
  * An uncaught exception on any rank (main or other thread) prints ``rank R: <reason>`` and
    calls MPI Abort (see ddtrain.parallel.abort_on_exception for the CLI's guard).
  * At exit, ranks meet in a Barrier (still watched), stop their watchdogs, then MPI finalises.
  * ``Allreduce`` of a float buffer of SHM_MIN_BYTES or more goes through the node's shared
    memory (`SharedMemorySum`, hierarchical across nodes) when every node runs the same number
    of ranks; MPI's own Allreduce otherwise (and for ``Iallreduce``). Results are bitwise the
    same on every rank either way.
  * The node methods (``shared_array``, ``node_sync``, ``cross_Allreduce``, ``cross_Bcast``,
    ``local_allgather_obj``) are ddtrain.parallel.shm's `Node`: the shared-memory training step
    (``dist.shared_memory``) runs over them. Shared windows are freed at close.

CuPy arrays: passed to MPI directly when the library reports CUDA support
(MPIX_Query_cuda_support, which mpi4py does not wrap, so it is looked up with ctypes);
otherwise staged through a pinned host buffer allocated once per device buffer. No GPU is
available where this was written: that path is deliberately small and untested here.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import socket
import sys
import threading
import time

import numpy as np

import mpi4py

# Must be set before MPI_Init (importing mpi4py.MPI initialises MPI).
mpi4py.rc.thread_level = "multiple"
from mpi4py import MPI  # noqa: E402

from ddtrain.parallel.watchdog import STEP_RING, Watchdog, collective_deadline, heartbeat_timeout  # noqa: E402

OUTPUT_GRACE = 0.3  # seconds between printing the reason and MPI_Abort
ABORT_GRACE = 5.0  # seconds the launcher gets to end the job after MPI_Abort before we exit
SHM_MIN_BYTES = 256 * 1024  # smaller buffers: MPI's own Allreduce is latency-bound and as good


def _is_device_array(buf) -> bool:
    return not isinstance(buf, np.ndarray) and hasattr(buf, "__cuda_array_interface__")


def cuda_aware() -> bool:
    """Whether the MPI library accepts CUDA device buffers (MPIX_Query_cuda_support() == 1).

    Open MPI and MPICH export that function when built with CUDA; a library without it
    (or without CUDA) gets host staging. MPI must be initialised.
    """
    try:
        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


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

    def __init__(self, owner: MPICommunicator, req: MPI.Request, after=None):
        self._owner, self._req, self._after = owner, req, after

    def Wait(self) -> None:
        owner = self._owner
        owner._op, owner._op_started = "Iallreduce", time.monotonic()
        self._req.Wait()
        owner._op_started = 0.0
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


class MPICommunicator:
    """The Communicator protocol over MPI.COMM_WORLD (see the module docstring for the rules).

    timeout: deadline (s) of every blocking collective (``--timeout``); None derives it from
        the step times. Heartbeats time out after min(timeout / 2, 10 s). See
        ddtrain.parallel.watchdog.collective_deadline and heartbeat_timeout.
    watchdog: False runs without the watchdog thread (benchmarks, tests of the bare calls).
    heartbeat_s: seconds between heartbeats.
    shared_memory: let ``Allreduce`` of large float buffers go through the node's shared
        memory (`SharedMemorySum`) when every node runs the same number of ranks.
    """

    def __init__(self, timeout: float | None = None, watchdog: bool = True, heartbeat_s: float = 0.5,
                 shared_memory: bool = True):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        world = MPI.COMM_WORLD
        self._comm = world.Dup()  # our collectives never match a library's on COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        # Asked on every rank (a collective no rank may skip): the shared-memory paths need
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
        self._staging: dict[tuple[int, int], np.ndarray] = {}
        self._cuda_aware: bool | None = None
        self._closed = False
        self._cross = None
        self._shared_sums: dict[tuple[int, str], SharedMemorySum] = {}
        self._node_windows: list[MPI.Win] = []  # shared_array's windows (NodeShards), freed at close
        if shared_memory and self.ranks_per_node is not None and self.local_size > 1:  # same on every rank
            self._cross = self._comm.Split(self.local_rank, key=self.rank)
        self.watchdog: Watchdog | None = None
        if watchdog and self.size > 1:
            if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                print(f"rank {self.rank}: the MPI library gives no THREAD_MULTIPLE support; running "
                      f"without the watchdog (a stalled rank can hang the job)", file=sys.stderr)
            else:
                self.watchdog = Watchdog(world.Dup(), self, heartbeat_timeout(timeout), heartbeat_s)
                self.watchdog.start()
        _install_abort_hooks(self)
        atexit.register(self.close)

    # -------------------------------------------------------------- step bookkeeping
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
        """Sum `buf` over ranks in place (any dtype MPI knows; numpy or CuPy)."""
        self._op, self._op_started = "Allreduce", time.monotonic()
        if _is_device_array(buf):
            self._on_device(buf, self._allreduce_host)
        else:
            self._allreduce_host(buf)
        self._op_started = 0.0

    def _allreduce_host(self, buf) -> None:
        """In-place sum of a host buffer (or a device one, for a CUDA-aware MPI)."""
        if (self._cross is not None and buf.nbytes >= SHM_MIN_BYTES and isinstance(buf, np.ndarray)
                and buf.ndim == 1 and buf.dtype.kind == "f" and buf.flags.c_contiguous):
            self._shared_sum(buf.size, buf.dtype)(buf)
        else:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def _shared_sum(self, n: int, dtype) -> SharedMemorySum:
        key = (n, dtype.str)
        shared = self._shared_sums.get(key)
        if shared is None:  # collective: every rank reaches here with the same (n, dtype)
            shared = self._shared_sums[key] = SharedMemorySum(self._local, self._cross, n, dtype)
        return shared

    def Iallreduce(self, buf) -> _Request:
        """Start summing `buf` in place; the sum is in `buf` after ``Wait()`` (or a true ``Test()``).

        `buf` must not be read or written until then.
        """
        if not _is_device_array(buf):
            return _Request(self, self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        if self._device_direct():
            _sync_device()
            return _Request(self, self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        host = self._host_copy(buf)
        return _Request(self, self._comm.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM),
                        after=lambda: buf.set(host))

    def Bcast(self, buf, root: int = 0) -> None:
        """Copy root's `buf` into every rank's `buf`."""
        self._op, self._op_started = "Bcast", time.monotonic()
        if _is_device_array(buf):
            self._on_device(buf, lambda b: self._comm.Bcast(b, root=root))
        else:
            self._comm.Bcast(buf, root=root)
        self._op_started = 0.0

    # -------------------------------------------------------------- small Python values
    def bcast_obj(self, obj, root: int = 0):
        self._op, self._op_started = "bcast_obj", time.monotonic()
        result = self._comm.bcast(obj, root=root)
        self._op_started = 0.0
        return result

    def allgather_obj(self, obj) -> list:
        self._op, self._op_started = "allgather_obj", time.monotonic()
        result = self._comm.allgather(obj)
        self._op_started = 0.0
        return result

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
        self._op, self._op_started = "Barrier", time.monotonic()
        self._comm.Barrier()
        self._op_started = 0.0

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

    # -------------------------------------------------------------- the node (ddtrain.parallel.shm.Node)
    # What NodeShards (the shared-memory data-parallel step, dist.shared_memory) calls. The
    # blocking ones are recorded for the watchdog's collective deadline like the others.
    def shared_array(self, shape: tuple, dtype) -> np.ndarray:
        """A numpy array in memory shared by this node's ranks (an MPI-3 shared window owned by
        local rank 0). Collective over the node; contents undefined until written."""
        self._op, self._op_started = "shared_array", time.monotonic()
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        win = MPI.Win.Allocate_shared(nbytes if self.local_rank == 0 else 0, dtype.itemsize, comm=self._local)
        win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, for Win_sync in node_sync
        self._node_windows.append(win)
        self._op_started = 0.0
        return np.ndarray(shape, dtype, buffer=win.Shared_query(0)[0])

    def node_sync(self) -> None:
        """Memory barrier + Barrier over the node: writes before it are seen by reads after it."""
        self._op, self._op_started = "node_sync", time.monotonic()
        win = self._node_windows[0] if self._node_windows else None
        if win is not None:
            win.Sync()
        self._local.Barrier()
        if win is not None:
            win.Sync()
        self._op_started = 0.0

    def _node_cross(self):
        """The ranks with this local rank on the other nodes; None on a single node."""
        if self.local_size == self.size:
            return None
        if self._cross is None:
            raise RuntimeError("node shared memory across nodes needs the same number of ranks on every "
                               "node (and MPICommunicator(shared_memory=True))")
        return self._cross

    def cross_Allreduce(self, buf) -> None:
        """Sum `buf` in place over the ranks with this local rank on every node (nothing on one)."""
        cross = self._node_cross()
        if cross is not None:
            self._op, self._op_started = "cross_Allreduce", time.monotonic()
            cross.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            self._op_started = 0.0

    def cross_Bcast(self, buf, root: int = 0) -> None:
        """Copy node `root`'s `buf` to the ranks with this local rank on the other nodes."""
        cross = self._node_cross()
        if cross is not None:
            self._op, self._op_started = "cross_Bcast", time.monotonic()
            cross.Bcast(buf, root=root)
            self._op_started = 0.0

    def local_allgather_obj(self, obj) -> list:
        """[obj of local rank 0, ..., obj of local rank L-1] on every rank of the node."""
        self._op, self._op_started = "local_allgather_obj", time.monotonic()
        result = self._local.allgather(obj)
        self._op_started = 0.0
        return result

    # -------------------------------------------------------------- CuPy arrays
    def _device_direct(self) -> bool:
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        return self._cuda_aware

    def _host_copy(self, buf) -> np.ndarray:
        """`buf`'s contents in this device buffer's pinned host twin (allocated once)."""
        key = (buf.data.ptr, buf.nbytes)
        host = self._staging.get(key)
        if host is None:
            import cupyx

            host = self._staging[key] = cupyx.empty_pinned(buf.shape, buf.dtype)
        buf.get(out=host)
        return host

    def _on_device(self, buf, call) -> None:
        """`call(b)` for a CuPy `buf`: b is `buf` itself if MPI is CUDA-aware, else its host twin."""
        if self._device_direct():
            _sync_device()  # MPI reads the memory outside CuPy's stream ordering
            call(buf)
            return
        host = self._host_copy(buf)
        call(host)
        buf.set(host)

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
        for shared in self._shared_sums.values():
            shared.free()
        self._shared_sums.clear()
        for win in self._node_windows:
            win.Unlock_all()
            win.Free()
        self._node_windows.clear()
        if self._cross is not None:
            self._cross.Free()
        self._local.Free()
        self._comm.Free()


class SharedMemorySum:
    """Sum of a float buffer over all ranks through the node's shared memory (MPI-3 window);
    across nodes, one inter-node Allreduce per chunk (hierarchical, as NCCL and Horovod do).

    The window holds one input slot per rank of the node (L ranks). Per call, every rank
    copies `buf` into its slot, then after a sync (Win_sync + node Barrier):
      one node, L <= FULL_SUM_MAX_RANKS: each rank adds all L slots, in slot order, straight
          into its own `buf` (no result copy: the fastest for the usual 2-4 ranks a node);
      otherwise: local rank i adds chunk i of all slots into a shared result, Allreduces that
          chunk with the ranks holding chunk i on the other nodes (`cross`), and after a sync
          every rank copies the result into `buf`.
    A final sync keeps the next call's copy-in from overwriting a slot another rank still
    reads. Each element is added in slot order wherever it is computed, so every rank gets
    the same bits. Measured on 2 ranks of a 2-core VM with 2.68 MB: ~1.3x a memcpy, against
    ~3-10x for MPICH's Allreduce (tests/mpi/bench_allreduce.py).

    local: the node's communicator (COMM_TYPE_SHARED); cross: ranks with the same local
    rank on the other nodes (size 1 on a single node); n, dtype: the buffer's length and type;
    full_sum: force (True) or forbid (False) the single-node full sum; None: choose.
    The constructor is collective over `local`.
    """

    ALIGN = 16  # elements: slots and chunks start on 64-byte cache lines (float32)
    FULL_SUM_MAX_RANKS = 4  # beyond, L reads of the whole buffer per rank cost more than chunks

    def __init__(self, local, cross, n: int, dtype, full_sum: bool | None = None):
        self.local, self.cross = local, cross
        size, rank = local.Get_size(), local.Get_rank()
        if full_sum is None:
            full_sum = cross.Get_size() == 1 and size <= self.FULL_SUM_MAX_RANKS
        elif full_sum and cross.Get_size() > 1:
            raise ValueError("full_sum needs a single node")
        self.full_sum = full_sum
        dtype = np.dtype(dtype)
        stride = -(-n // self.ALIGN) * self.ALIGN
        rows = size if self.full_sum else size + 1  # + the shared result
        nbytes = rows * stride * dtype.itemsize
        self.win = MPI.Win.Allocate_shared(nbytes if rank == 0 else 0, dtype.itemsize, comm=local)
        memory, _ = self.win.Shared_query(0)
        whole = np.ndarray((rows, stride), dtype=dtype, buffer=memory)
        self.slots, self.result = whole[:size, :n], whole[-1, :n]
        self.mine = self.slots[rank]
        per = -(-stride // size // self.ALIGN) * self.ALIGN
        self.chunk = slice(min(n, rank * per), min(n, (rank + 1) * per))
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, for Win_sync

    def _sync(self) -> None:
        self.win.Sync()
        self.local.Barrier()
        self.win.Sync()

    def _add_slots(self, part: slice, out: np.ndarray) -> None:
        slots = self.slots
        np.add(slots[0, part], slots[1, part], out=out)
        for j in range(2, len(slots)):
            out += slots[j, part]

    def __call__(self, buf: np.ndarray) -> None:
        np.copyto(self.mine, buf)
        self._sync()
        if self.full_sum:
            self._add_slots(slice(None), buf)
        else:
            c = self.chunk
            if c.stop > c.start:
                out = self.result[c]
                self._add_slots(c, out)
                if self.cross.Get_size() > 1:
                    self.cross.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
            self._sync()
            np.copyto(buf, self.result)
        self._sync()

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


def _sync_device() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def _install_abort_hooks(comm: MPICommunicator) -> None:
    """Uncaught exceptions (main thread or any other) print ``rank R: <reason>`` and Abort.

    Without this, one rank's crash leaves the others blocked in a collective until the
    watchdog's deadline: MPICH does not end a job when one rank exits with an error status.
    """
    from ddtrain.parallel import report_and_abort

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, SystemExit) and exc.code in (0, None):
            return
        report_and_abort(comm, exc)

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        report_and_abort(comm, args.exc_value)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
