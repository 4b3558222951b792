"""Fault drills under mpiexec: one rank fails at a given step; the job must end, non-zero.

usage: mpiexec -n N python tests/mpi/failure.py MODE RANK STEP [TIMEOUT]
  MODE: raise (an exception), exit (sys.exit(3)), kill (SIGKILL), stop (SIGSTOP),
        hang (alive, heartbeating, but never enters the next collective),
        late (no failure: the rank computes 0.75 x TIMEOUT s outside MPI, longer than the
        heartbeat timeout, while the others wait; then all finish and must exit 0)
Each rank prints "pid R PID;" first (so the test can clean up a stopped process), then steps
of Allreduce until the failure; a rank never reaching the end is the point of the drill.
"""

import os
import signal
import sys
import time

import numpy as np

from ddtrain.parallel import abort_on_exception, world

mode, bad_rank, bad_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else None
comm = world(timeout=timeout)
print(f"pid {comm.rank} {os.getpid()};", flush=True)
buf = np.ones(1000, dtype=np.float32)
with abort_on_exception(comm):
    for step in range(bad_step + 5 if mode == "late" else 10_000):
        comm.set_step(step)
        if comm.rank == bad_rank and step == bad_step:
            print(f"failing {mode} at {time.time():.3f};", flush=True)
            if mode == "raise":
                raise RuntimeError(f"injected failure at step {step}")
            if mode == "exit":
                sys.exit(3)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            if mode == "hang":
                while True:
                    time.sleep(0.1)
            if mode == "late":
                end = time.monotonic() + 0.75 * timeout
                while time.monotonic() < end:  # busy in Python and in numpy, not in MPI
                    np.sort(np.random.default_rng(0).random(100_000))
        comm.Allreduce(buf)
        buf[...] = 1
        time.sleep(0.01)
print(f"rank {comm.rank}: finished", flush=True)
