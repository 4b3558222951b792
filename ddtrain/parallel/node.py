"""A node's ranks over shared memory: the `Node` protocol and the cut of a flat vector into parts.

One helper for both things the shared-memory gradient sync needs (and nothing else here does):
  * `Node`: what a communicator offers over the node (MPINode, ddtrain/parallel/mpi_node.py,
    implements it over MPI-3 shared windows);
  * `part_bounds`: local rank r's part [start, stop) of a flat vector of P elements, the one
    way ddtrain cuts a vector over ranks (parts start on cache lines, so two ranks never write
    the same line).
"""

from __future__ import annotations

from typing import Any, Protocol

ALIGN_BYTES = 64  # parts start on cache lines: two ranks never write the same line


class Node(Protocol):
    """One rank's view of its node (implemented over MPI-3 shared windows by MPINode)."""

    local_rank: int
    local_size: int
    nodes: int | None  # number of nodes when every node runs local_size ranks, else None

    def shared_array(self, shape: tuple, dtype) -> Any:
        """A numpy array in memory shared by the node's ranks: the same bytes on each of them.
        Collective over the node; contents undefined until written."""

    def node_sync(self) -> None:
        """Memory barrier + barrier over the node: writes before it are seen by reads after it."""

    def cross_Allreduce_init(self, buf) -> Any:
        """A persistent in-place sum of `buf` over the ranks with this local rank on every node
        (a PersistentRequest: Start(), then Wait() or Test(); `buf` untouched in between; always
        done on one node or for an empty `buf`). Collective over those ranks."""

    def cross_Bcast(self, buf, root: int = 0) -> None:
        """Copy node `root`'s `buf` to the ranks with this local rank on the other nodes."""

    def local_allgather_obj(self, obj: Any) -> list:
        """[obj of local rank 0, ..., obj of local rank L-1] on every rank of the node."""


def part_bounds(size: int, parts: int, i: int, itemsize: int = 4) -> tuple[int, int]:
    """[start, stop) of part i when `size` elements are cut into `parts` near-equal parts whose
    starts are multiples of ALIGN_BYTES (the last parts may be shorter, or empty)."""
    if not 0 <= i < parts:
        raise ValueError(f"part {i} of {parts}")
    align = max(1, ALIGN_BYTES // itemsize)
    per = -(-size // parts // align) * align if size else 0
    per = max(per, align)
    return min(size, i * per), min(size, (i + 1) * per)
