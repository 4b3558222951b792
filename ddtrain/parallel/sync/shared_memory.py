"""Data parallelism inside a node through shared memory: no gradient moves, each rank updates 1/L.

Why: with L ranks on one node, an allreduce of the flat gradient (2.68 MB for the mlp) costs
several memcpys per step, while the step itself is ~3 ms. Here the gradient is never copied:
it is read where backward wrote it, by the one rank that needs it.

Layout: one node-shared block (L + 1, P) of the parameters' dtype, P = number of parameters:
    block[0]       the parameters: ONE copy per node, every rank's layers view it
    block[1 + r]   local rank r's gradient slot: its backward writes there (FlatParams.grad)
    flags[r]       local rank r's StepFlags
Local rank r owns the part [start_r, stop_r) of the flat vector (ddtrain.parallel.node.part_bounds).
A training step, on every rank:
    synchronize():  node sync             (every slot and flag is complete)
                    flags summed over the node's slots
                    my slot[my part] += the other slots' [my part]
                    several nodes: the flags and my part summed with the ranks owning it
                    elsewhere (two persistent MPI allreduces, made once at start)
    optimizer.step(lr) over `params` = (parameters[my part], my slot[my part])
    after_update(): node sync             (every part is updated: the next forward may read)
With train.nonfinite=stop on one node, the optimizer checks my part of the sum as it updates it
(instead of each rank checking its own slot before the sum, a pass over the whole gradient) and
after_update reads every rank's finding from the flags after that node sync.
So the reduction reads each gradient element once, and each rank runs the optimizer over P / L
elements. Optimizer state (momentum) exists only for the owner's part (ZeRO stage 1 inside the
node); `full_optimizer_state` / `optimizer_state_part` convert for checkpoints. Buffers
(BatchNorm's running statistics) stay per rank: every rank computes them from the same
MPI-summed batch statistics.

Bits: part r of the sum is computed by one rank per node (and made identical across nodes by
the Allreduce), and the parameters are one copy, so every rank of a node sees the same weights
by construction. Float sums are taken in another order than MPI's Allreduce would, so results
equal the allreduce path to float32 rounding, not bitwise (as between any two rank counts).

Rules: every rank of every node builds it at the same point (collective), with the same number
of ranks on every node; the optimizer is built over `params` after it. CPU only: a GPU's memory
is not the node's shared memory. Failure modes: a rank that dies or stalls leaves its peers in
a node sync, where the watchdog's deadline names it.
"""

from __future__ import annotations

import numpy as np

from ddtrain.parallel.node import part_bounds
from ddtrain.parallel.sync.base import StepFlags, SyncBase

N_FLAGS = 2  # StepFlags' fields, in order; then what the rank's update found (after_update)


class NodeSharedMemory(SyncBase):
    """The shared-memory step for one rank (see the module docstring). comm: an
    MPICommunicator (its `node()` gives the shared windows); model: moved into the block."""

    def __init__(self, comm, model):
        super().__init__(comm, model)
        node = self.node = comm.node()
        flat = model.params
        L, r = node.local_size, node.local_rank
        block = node.shared_array((L + 1, flat.size), flat.data.dtype)
        self._flags = node.shared_array((L, N_FLAGS + 1), "int64")
        # Local rank 0 brings the parameters (every rank built the same ones; one writer is
        # enough and is race-free); every rank zeroes its own slot.
        model.use_buffers(block[0], block[1 + r], copy_data=(r == 0))
        node.node_sync()
        self.slots = block[1:]
        self.start, self.stop = part_bounds(flat.size, L, r, flat.data.dtype.itemsize)
        self.params = flat.part(self.start, self.stop)
        self.full = flat
        # Across nodes, the node's flags and my part are summed with my peers on the other
        # nodes: two persistent allreduces over buffers that never move (nothing on one node).
        self._agreed = np.zeros(N_FLAGS, dtype="int64")
        self._agreed_sum = node.cross_Allreduce_init(self._agreed)
        self._part_sum = node.cross_Allreduce_init(self.params.grad)
        nodes = comm.size // L
        self.weights_can_differ = nodes > 1  # one node holds one copy: nothing can differ
        self.update_can_check = nodes == 1  # the updates' flags ride after_update's node sync
        self.label = (f"node shared memory ({L} ranks on one node)" if nodes == 1 else
                      f"node shared memory ({L} ranks per node), each part allreduced across {nodes} nodes")

    def broadcast_initial_state(self) -> None:
        """Node 0's parameters (e.g. rank 0's checkpoint, loaded by local rank 0 into the shared
        block) on every node; rank 0's buffers on every rank."""
        if self.node.local_rank == 0:
            self.node.cross_Bcast(self.full.data, root=0)
        self.node.node_sync()
        self._broadcast_buffers()

    def synchronize(self, flags: StepFlags) -> StepFlags:
        node, r = self.node, self.node.local_rank
        # My own slot is non-finite iff my share makes the sum so: check it before summing.
        self._flags[r, :N_FLAGS] = flags.stop, self.local_nonfinite()
        node.node_sync()
        self.calls["node_sync"] += 1
        agreed = self._agreed
        self._flags[:, :N_FLAGS].sum(axis=0, out=agreed)
        self._agreed_sum.Start()  # the node's flags travel to the other nodes meanwhile
        a, b = self.start, self.stop
        mine = self.params.grad
        for j in range(len(self.slots)):
            if j != r and b > a:
                mine += self.slots[j, a:b]
        self._part_sum.Start()
        self._agreed_sum.Wait()
        self._part_sum.Wait()
        if node.local_size != self.comm.size:
            self.calls["persistent cross-node Allreduce"] += 1 + (b > a)
        return StepFlags(stop=int(agreed[0]), nonfinite=int(agreed[1]))

    def after_update(self, nonfinite: int = 0) -> int:
        r = self.node.local_rank
        if self.optimizer_checks:
            self._flags[r, N_FLAGS] = nonfinite  # what my part's update found; read after the sync
        self.node.node_sync()
        self.calls["node_sync"] += 1
        if not self.optimizer_checks:
            return nonfinite
        # Its own column: a rank past this sync may already write the next step's flags, and the
        # next write of this column comes after the next step's first node sync.
        return int(self._flags[:, N_FLAGS].sum())

    def full_optimizer_state(self, state: dict) -> dict:
        """The whole optimizer state from each local rank's state of its part, as a one-process
        optimizer would have it: arrays concatenated in part order, "step" kept. Collective."""
        import numpy as np

        parts = self.node.local_allgather_obj(state)
        return {k: (v if k == "step" else np.concatenate([p[k] for p in parts])) for k, v in state.items()}

    def optimizer_state_part(self, state: dict) -> dict:
        return {k: (v if k == "step" else v[self.start:self.stop]) for k, v in state.items()}
