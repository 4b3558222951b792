"""Benchmark: the gradient allreduce vs a memcpy of the same buffer (run under mpiexec -n K).

usage: mpiexec -n 2 python tests/mpi/bench_allreduce.py [N_FLOATS,...] [REPEATS]
Default N_FLOATS = 669,706: the mlp config's parameters (784-512-512-10), 2.68 MB of float32.
The methods run interleaved (so each sees the caches the others leave, as in training);
rank 0 prints the median of each in ms and as a multiple of that memcpy and of a memcpy
repeated back to back (hot cache).
"""

import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from ddtrain.parallel.mpi import MPICommunicator

sizes = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [669_706]
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 200
plain = MPICommunicator(shared_memory=False, watchdog=False)
comm = MPICommunicator(shared_memory=True)  # what training uses (watchdog thread included)

for n in sizes:
    buf = np.zeros(n, dtype=np.float32)
    src, dst = np.zeros_like(buf), np.empty_like(buf)
    methods = {
        "memcpy (np.copyto)": lambda: np.copyto(dst, src),
        "MPICH Allreduce": lambda: plain._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
        "MPICH Iallreduce + Wait": lambda: plain.Iallreduce(buf).Wait(),
        "ddtrain Allreduce": lambda: comm.Allreduce(buf),
    }
    hot = []  # memcpy back to back: both buffers stay in cache (the optimistic reference)
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        hot.append(time.perf_counter() - t0)
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            plain.Barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(max(v) for v in zip(*plain.allgather_obj(t))) for name, t in times.items()}
    if comm.rank == 0:
        path = "shared memory" if comm._cross is not None and buf.nbytes >= 256 * 1024 else "MPI"
        print(f"{comm.size} ranks ({comm.local_size} on this node), {n:,} float32 ({buf.nbytes / 1e6:.2f} MB), "
              f"median of {repeats} (slowest rank); ddtrain Allreduce path: {path}")
        base = med["memcpy (np.copyto)"]
        hot_s = statistics.median(hot)
        print(f"  {'memcpy, hot cache':26s} {1e3 * hot_s:8.3f} ms")
        for name, s in med.items():
            print(f"  {name:26s} {1e3 * s:8.3f} ms  {s / base:6.1f}x memcpy  {s / hot_s:6.1f}x hot memcpy")
