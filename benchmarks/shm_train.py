"""ddtrain's trainer with the shared-memory sharded step (ddtrain.dist.shm), until it is wired in.

usage: mpiexec -n 2 python benchmarks/shm_train.py --batch 128 --samples 59904 --run-dir DIR

It builds the Trainer exactly as `ddtrain train --config mlp --threads 1` does, then swaps in
NodeShards: the reducer's finish() becomes shards.reduce(), the optimizer is built over the
rank's part and followed by shards.publish(). Everything else (data, forward, backward, loss,
logging, metrics.jsonl, summary.json) is the real trainer. `MPINode` is the Node interface
over mpi4py: the few lines ddtrain.dist.mpi.MPICommunicator needs to provide it.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # 1 BLAS thread per rank, before numpy loads (as ddtrain's CLI decides)

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402


class MPINode:
    """ddtrain.dist.shm.Node over mpi4py (a reference for MPICommunicator)."""

    def __init__(self, comm: MPI.Comm):
        self.local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self.cross = comm.Split(self.local_rank, key=comm.Get_rank())
        self._windows = []

    def shared_array(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        win = MPI.Win.Allocate_shared(nbytes if self.local_rank == 0 else 0, dtype.itemsize, comm=self.local)
        win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch for Win_sync
        self._windows.append(win)
        return np.ndarray(shape, dtype, buffer=win.Shared_query(0)[0])

    def node_sync(self):
        win = self._windows[0] if self._windows else None
        if win is not None:
            win.Sync()
        self.local.Barrier()
        if win is not None:
            win.Sync()

    def cross_Allreduce(self, buf):
        if self.cross.Get_size() > 1:
            self.cross.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def cross_Bcast(self, buf, root=0):
        if self.cross.Get_size() > 1:
            self.cross.Bcast(buf, root=root)

    def local_allgather_obj(self, obj):
        return self.local.allgather(obj)


class ShardReducer:
    """Stands in for GradientReducer: nothing during backward, the node's reduction at finish()."""

    pending = False

    def __init__(self, shards):
        self.shards = shards

    def grads_ready(self, offset):
        return None

    def finish(self):
        return self.shards.reduce()


class PublishingOptimizer:
    """The rank's optimizer over its part, then the sync that publishes the part."""

    def __init__(self, optimizer, shards):
        self.optimizer, self.shards = optimizer, shards

    def step(self, lr):
        self.optimizer.step(lr)
        self.shards.publish()

    def __getattr__(self, name):  # state_dict etc. (a benchmark stand-in, not the wiring)
        return getattr(self.optimizer, name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, required=True, help="global batch")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    from pathlib import Path

    from ddtrain.backend import CPU
    from ddtrain.config import load_config
    from ddtrain.dist import world
    from ddtrain.dist.shm import NodeShards
    from ddtrain.engine.optim import make_optimizer
    from ddtrain.train.trainer import Trainer

    steps = args.samples // args.batch
    cfg = load_config("mlp", {"train.batch_size": args.batch, "train.epochs": 1,
                              "data.train_samples": args.samples,
                              "train.log_every": min(50, max(1, steps // 5))}, args.sets)
    comm = world()
    run_dir = Path(args.run_dir)
    if comm.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    trainer = Trainer(cfg, comm, CPU, run_dir, data_dir=args.data_dir, log=lambda m: None)
    trainer.agree()
    shards = NodeShards(MPINode(MPI.COMM_WORLD), trainer.model)
    o = cfg.optimizer
    opt = make_optimizer(o.name, shards.params, momentum=o.momentum, nesterov=o.nesterov,
                         weight_decay=o.weight_decay)
    trainer.optimizer = PublishingOptimizer(opt, shards)
    trainer.reducer = ShardReducer(shards)
    trainer.save = lambda: None  # checkpoints need the wiring (full_state); not measured here
    trainer.fit()


if __name__ == "__main__":
    main()
