"""MPINode: one rank's view of its node over MPI-3 shared windows (ddtrain.parallel.node.Node).

What the shared-memory gradient sync (ddtrain/parallel/sync/shared_memory.py) is built on:
arrays in memory shared by the node's ranks, a sync that makes writes visible, and the
communicator of this local rank's peers on the other nodes. Made by
`MPICommunicator.node()` (collective), freed with the communicator. Blocking calls are watched
by the communicator's collective deadline like every other collective.
"""

from __future__ import annotations

import numpy as np

from ddtrain.parallel.comm import DoneRequest
from ddtrain.parallel.mpi import MPI


class MPINode:
    """The `Node` protocol over an MPICommunicator's node communicator (COMM_TYPE_SHARED)."""

    def __init__(self, comm):
        self._owner = comm
        self._local = comm._local
        self.local_rank, self.local_size = comm.local_rank, comm.local_size
        self.nodes = comm.size // comm.local_size if comm.ranks_per_node is not None else None
        # The ranks with this local rank on the other nodes; only where every node runs as
        # many ranks (ranks_per_node is the same on every rank, so all split or none).
        self._cross = comm._comm.Split(self.local_rank, key=comm.rank) if comm.ranks_per_node else None
        self._windows: list = []

    def shared_array(self, shape: tuple, dtype) -> np.ndarray:
        """A numpy array in memory shared by this node's ranks (a window owned by local rank 0).
        Collective over the node; contents undefined until written."""
        with self._owner._watched("shared_array"):
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            win = MPI.Win.Allocate_shared(nbytes if self.local_rank == 0 else 0, dtype.itemsize,
                                          comm=self._local)
            win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, for Win_sync in node_sync
            self._windows.append(win)
            return np.ndarray(shape, dtype, buffer=win.Shared_query(0)[0])

    def node_sync(self) -> None:
        """Memory barrier + Barrier over the node: writes before it are seen by reads after it."""
        with self._owner._watched("node_sync"):
            win = self._windows[0] if self._windows else None
            if win is not None:
                win.Sync()
            self._local.Barrier()
            if win is not None:
                win.Sync()

    def _cross_comm(self):
        if self.local_size == self._owner.size:
            return None
        if self._cross is None:
            raise RuntimeError("node shared memory across nodes needs the same number of ranks on every node")
        return self._cross

    def cross_Allreduce_init(self, buf):
        """A persistent in-place SUM of `buf` over the ranks with this local rank on every node
        (MPI_Allreduce_init over the cross-node communicator; Start/Wait every step). On one
        node, or for an empty `buf` (a part with no elements), there is nothing to sum: a request
        that is always done."""
        cross = self._cross_comm()
        if cross is None or buf.size == 0:
            return DoneRequest()
        with self._owner._watched("cross_Allreduce_init"):
            return self._owner._persistent_sum(cross, buf)

    def cross_Bcast(self, buf, root: int = 0) -> None:
        """MPI_Bcast from node `root` to the ranks with this local rank on the other nodes."""
        cross = self._cross_comm()
        if cross is not None:
            with self._owner._watched("cross_Bcast"):
                cross.Bcast(buf, root=root)

    def local_allgather_obj(self, obj) -> list:
        """[obj of local rank 0, ..., obj of local rank L-1] on every rank of the node."""
        with self._owner._watched("local_allgather_obj"):
            return self._local.allgather(obj)

    def free(self) -> None:
        for win in self._windows:
            win.Unlock_all()
            win.Free()
        self._windows.clear()
        if self._cross is not None:
            self._cross.Free()
            self._cross = None
