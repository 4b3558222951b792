"""ddtrain's gradient allreduce against a bare mpi4py Allreduce of the same bytes, and a memcpy.

usage: mpiexec -n 2 python benchmarks/allreduce.py [--repeats 200] [--config mlp]

The buffer is the config's flat gradient (mlp: 669,706 float32, 2.68 MB). The methods run
interleaved, each after a Barrier, so each sees the caches the others leave (as in training);
a call's time is the slowest rank's. Rank 0 prints one JSON line: the median microseconds of
  memcpy            np.copyto of the buffer into another (the physical unit of the reduction)
  bare_allreduce    MPI.COMM_WORLD.Allreduce(IN_PLACE, buf, SUM): what mpi4py gives anyone
  bare_iallreduce   Iallreduce + Wait of the whole buffer
  ddtrain_blocking  the reducer as the allreduce path trains by default (dist.overlap=false):
                    one comm.Allreduce in finish(), which takes the node's shared memory
                    (SharedMemorySum) when it can
  ddtrain_overlap   the reducer with dist.overlap=true: grads_ready(offset) for each layer,
                    last first (bucketed Iallreduce), then finish()
  shm_sum           SharedMemorySum called directly (the shared-memory reduction alone),
                    when ddtrain.parallel.mpi provides it
The communicator is MPICommunicator as training builds it (watchdog thread included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--config", default="mlp")
    args = p.parse_args()

    from ddtrain.config import load_config
    from ddtrain.parallel.mpi import MPICommunicator
    from ddtrain.parallel.reducer import GradientReducer
    from ddtrain.engine.model import build_model

    cfg = load_config(args.config)
    comm = MPICommunicator()
    world = MPI.COMM_WORLD
    model = build_model(cfg.model.layers, (28, 28), seed=0)
    params = model.params
    firsts: dict[str, int] = {}  # layer index -> its first flat index, as Sequential.backward reports
    for slot in params.slots:
        firsts.setdefault(slot.name.split(".")[0], slot.start)
    layer_starts = sorted(firsts.values(), reverse=True)
    overlap = GradientReducer(comm, params, bucket_mb=cfg.dist.bucket_mb, overlap=True)
    blocking = GradientReducer(comm, params, bucket_mb=cfg.dist.bucket_mb, overlap=False)
    grad = params.grad
    src, dst = np.ones_like(grad), np.empty_like(grad)

    def reducer_step(reducer):
        for offset in layer_starts:
            reducer.grads_ready(offset)
        reducer.finish()

    methods = {
        "memcpy": lambda: np.copyto(dst, src),
        "bare_allreduce": lambda: world.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM),
        "bare_iallreduce": lambda: world.Iallreduce(MPI.IN_PLACE, grad, op=MPI.SUM).Wait(),
        "ddtrain_overlap": lambda: reducer_step(overlap),
        "ddtrain_blocking": lambda: reducer_step(blocking),
    }
    try:
        from ddtrain.parallel.mpi import SharedMemorySum
    except ImportError:
        SharedMemorySum = None
    if SharedMemorySum is not None:
        local = world.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        shared = SharedMemorySum(local, world.Split(local.Get_rank(), key=comm.rank), grad.size, grad.dtype)
        methods["shm_sum"] = lambda: shared(grad)

    times = {name: [] for name in methods}
    for i in range(args.repeats + 5):
        for name, fn in methods.items():
            grad.fill(1.0 / comm.size)  # stays finite and small however often it is summed
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 5:  # the first calls build windows and buckets
                times[name].append(time.perf_counter() - t0)
    slowest = {name: [max(v) for v in zip(*world.allgather(t))] for name, t in times.items()}
    if comm.rank == 0:
        med = {name: 1e6 * statistics.median(v) for name, v in slowest.items()}
        print(json.dumps({"ranks": comm.size, "floats": int(grad.size), "bytes": int(grad.nbytes),
                          "repeats": args.repeats, "median_us": med,
                          "p90_us": {n: 1e6 * statistics.quantiles(v, n=10)[-1] for n, v in slowest.items()},
                          "bucket_mb": cfg.dist.bucket_mb, "buckets": len(overlap.buckets)}), flush=True)


if __name__ == "__main__":
    main()
