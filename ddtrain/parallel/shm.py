"""Data parallelism inside a node through shared memory: no gradient moves, each rank updates 1/L.

Why: with L ranks on one node, an allreduce of the flat gradient (2.68 MB for the mlp) costs at
least a few memcpys per step (MPICH's Allreduce: ~10), while the step itself is ~3 ms. Here the
gradient is never copied: it is read where backward wrote it, by the one rank that needs it.

Layout: one node-shared block (L + 1, P) of the parameters' dtype, P = number of parameters:
    block[0]       the parameters: ONE copy per node, every rank's layers view it
    block[1 + r]   local rank r's gradient slot: its backward writes there (FlatParams.grad)
Local rank r owns the part [start_r, stop_r) of the flat vector (`part_bounds`, cache-line
aligned). A training step, on every rank:
    forward, backward                 (gradient of my samples -> my slot)
    reduce():  node sync              (every slot is complete; flags summed on the way)
               my slot[my part] += the other slots' [my part]
               several nodes: Allreduce of my part with the ranks owning it on the other nodes
    optimizer.step(lr) over `self.params` = (parameters[my part], my slot[my part])
    publish(): node sync              (every part is updated: the next forward may read)
So the reduction reads each gradient element once (the single-process optimizer reads it too),
and each rank runs the optimizer over P / L elements: on two ranks, reduction + update costs
less than one process's update alone. Optimizer state (momentum) exists only for the owner's
part (ZeRO stage 1 inside the node); `full_state`/`state_part` convert for checkpoints.

Bits: part r of the sum is computed by one rank per node (and made identical across nodes by
the Allreduce), and the parameters are one copy, so every rank of a node sees the same weights
by construction. Float sums are taken in another order than MPI's Allreduce would, so results
equal a plain allreduce run to float32 rounding, not bitwise (as between any two rank counts).

Rules: every rank of every node creates `NodeShards` at the same point (collective), calls
reduce() and publish() once per step in that order (also on a skipped step), and builds its
optimizer over `shards.params` after creating it. The communicator must provide the `Node`
methods below (ddtrain.parallel.mpi.MPICommunicator does); every node runs the same number of ranks.
CPU only: a GPU's memory is not a node's shared memory.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

ALIGN_BYTES = 64  # parts start on cache lines: two ranks never write the same line
MAX_FLAGS = 8  # small integers agreed on in reduce() (the trainer's stop and non-finite flags)


class Node(Protocol):
    """What NodeShards needs from a communicator (implemented over MPI-3 shared windows)."""

    local_rank: int
    local_size: int

    def shared_array(self, shape: tuple, dtype) -> Any:
        """A numpy array in memory shared by the node's ranks: the same bytes on each of them.
        Collective over the node; contents undefined until written."""

    def node_sync(self) -> None:
        """Memory barrier + barrier over the node: writes before it are seen by reads after it."""

    def cross_Allreduce(self, buf) -> None:
        """Sum `buf` in place over the ranks with this local rank on every node (nothing on one)."""

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


class NodeShards:
    """The shared-memory data-parallel step for one rank (see the module docstring).

    node: a `Node` (the job's communicator); model: a Sequential whose flat buffers move into
    the node's shared block (its layers are re-bound). After construction:
      params: the FlatPart this rank's optimizer updates (`make_optimizer(name, shards.params)`);
      start, stop: that part's flat range.
    """

    def __init__(self, node: Node, model):
        self.node = node
        flat = model.params
        L, r = node.local_size, node.local_rank
        block = node.shared_array((L + 1, flat.size), flat.data.dtype)
        self._flags = node.shared_array((L, MAX_FLAGS), "int64")
        # Local rank 0 brings the parameters (every rank built the same ones; one writer is
        # enough and is race-free); every rank zeroes its own slot.
        model.use_buffers(block[0], block[1 + r], copy_data=(r == 0))
        node.node_sync()
        self.slots = block[1:]
        self.slot = block[1 + r]  # this rank's whole gradient (= model.params.grad)
        self.start, self.stop = part_bounds(flat.size, L, r, flat.data.dtype.itemsize)
        self.params = flat.part(self.start, self.stop)
        self.full = flat

    def reduce(self, flags=None) -> float:
        """After backward: this rank's part of the gradient summed over all ranks of all nodes,
        in `self.params.grad`. Returns the seconds spent (sync wait included).

        flags: optional int64 array (at most MAX_FLAGS) summed over all ranks in place, in the
        same sync: e.g. [stop requested, my gradient is non-finite], so that every rank takes or
        skips the update alike without another collective. (A rank's own gradient is non-finite
        iff its share makes the sum so: check `slot` before calling, not the part after.)
        """
        t0 = time.perf_counter()
        r = self.node.local_rank
        if flags is not None:
            if len(flags) > MAX_FLAGS:
                raise ValueError(f"at most {MAX_FLAGS} flags, not {len(flags)}")
            self._flags[r, :len(flags)] = flags
        self.node.node_sync()
        if flags is not None:
            flags[...] = self._flags[:, :len(flags)].sum(axis=0)
            self.node.cross_Allreduce(flags)
        a, b = self.start, self.stop
        mine = self.params.grad
        for j in range(len(self.slots)):
            if j != r and b > a:
                mine += self.slots[j, a:b]
        if b > a:
            self.node.cross_Allreduce(mine)
        return time.perf_counter() - t0

    def publish(self) -> None:
        """After this rank's update (or a skipped step): every part updated on every rank."""
        self.node.node_sync()

    def bcast_params(self) -> None:
        """Node 0's parameters (e.g. rank 0's checkpoint, loaded by local rank 0 into the shared
        block) on every node. Collective; replaces comm.Bcast(params.data)."""
        if self.node.local_rank == 0:
            self.node.cross_Bcast(self.full.data, root=0)
        self.node.node_sync()

    def full_state(self, part_state: dict) -> dict:
        """The whole optimizer state from each local rank's `optimizer.state_dict()` (of its part),
        as a one-process optimizer would have it: arrays concatenated in part order, "step" kept.
        Collective over the node."""
        parts = self.node.local_allgather_obj(part_state)
        out = {}
        for key in part_state:
            out[key] = part_state[key] if key == "step" else _concatenate([p[key] for p in parts])
        return out

    def state_part(self, full_state: dict) -> dict:
        """This rank's share of a whole optimizer state (a checkpoint's), for load_state_dict."""
        return {k: (v if k == "step" else v[self.start:self.stop]) for k, v in full_state.items()}


def _concatenate(arrays):
    import numpy as np
    return np.concatenate(arrays)
