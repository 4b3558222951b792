"""The communicator interface, and its one-process implementation.

Method names follow the MPI calls they stand for (as mpi4py and ChainerMN name them):
capitalised methods move arrays through buffers, never pickling; ``*_obj`` methods move
small Python values (pickled by MPI) and are for start-up, metrics and control, never
for the hot loop.

Rules every implementation keeps (and every caller relies on):
  * every rank calls the same collectives in the same order with the same shapes;
  * reductions are sums unless said otherwise; in-place calls overwrite ``buf``;
  * after ``Allreduce`` every rank holds bitwise the same result.

`world()` (in ddtrain.parallel) picks the implementation; only ddtrain/parallel/mpi.py imports mpi4py.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol


class Request(Protocol):
    def Wait(self) -> None: ...

    def Test(self) -> bool: ...


class PersistentRequest(Protocol):
    """A collective set up once over a fixed buffer and run again at every ``Start()``."""

    def Start(self) -> None: ...

    def Wait(self) -> None: ...

    def Test(self) -> bool: ...


class Communicator(Protocol):
    rank: int
    size: int
    local_rank: int  # rank among the processes on this node
    local_size: int  # processes on this node
    ranks_per_node: int | None  # local_size when every node runs that many, else None
    hostname: str

    def Allreduce(self, buf) -> None:
        """Sum `buf` (an array, any dtype) over ranks, in place."""

    def Iallreduce(self, buf) -> Request:
        """Start summing `buf` in place; the result is there after ``Wait()``."""

    def Allreduce_init(self, buf) -> PersistentRequest:
        """A persistent in-place sum of `buf` over ranks: each ``Start()`` sums what `buf` holds
        then, the result there after ``Wait()`` (or a true ``Test()``). Every rank makes its
        persistent requests, and starts them, in the same order."""

    def Bcast(self, buf, root: int = 0) -> None:
        """Copy root's `buf` into every rank's `buf`, in place."""

    def bcast_obj(self, obj: Any, root: int = 0) -> Any: ...

    def allgather_obj(self, obj: Any) -> list: ...

    def allreduce_obj(self, obj: Any, op: str = "sum") -> Any:
        """op: "sum", "max" or "min" of small Python numbers (or tuples of them)."""

    def Barrier(self) -> None: ...

    def Abort(self, code: int = 1) -> None:
        """End every rank of the job now (never returns)."""

    def set_step(self, step: int) -> None:
        """The trainer's current step (called once per step), named by timeout messages."""


class DoneRequest:
    """A request with nothing to wait for: a sum over one process (or over one node)."""

    def Start(self) -> None:
        return None

    def Wait(self) -> None:
        return None

    def Test(self) -> bool:
        return True


class SingleProcess:
    """The communicator of a one-process run: every collective is the identity.

    Used whenever ddtrain is not started by an MPI launcher, so a laptop run never
    imports mpi4py and never needs an MPI library.
    """

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    ranks_per_node = 1

    def __init__(self):
        self.hostname = socket.gethostname()

    def Allreduce(self, buf) -> None:
        return None

    def Iallreduce(self, buf) -> Request:
        return DoneRequest()

    def Allreduce_init(self, buf) -> PersistentRequest:
        return DoneRequest()

    def Bcast(self, buf, root: int = 0) -> None:
        return None

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather_obj(self, obj: Any) -> list:
        return [obj]

    def allreduce_obj(self, obj: Any, op: str = "sum") -> Any:
        return obj

    def Barrier(self) -> None:
        return None

    def Abort(self, code: int = 1) -> None:
        raise SystemExit(code)

    def set_step(self, step: int) -> None:
        return None
