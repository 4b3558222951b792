"""Benchmark: a training step's backward + gradient reduction, per reducer setting.

usage: mpiexec -n 2 python tests/mpi/bench_reducer.py [GLOBAL_BATCH] [STEPS]
The mlp config's model (669,706 parameters) on random inputs; each rank takes
GLOBAL_BATCH / size samples. Prints, per setting, the median backward + finish() time and
the exposed wait finish() reports (slowest rank).
"""

import statistics
import sys
import time

import numpy as np

from ddtrain.parallel.mpi import MPICommunicator
from ddtrain.parallel.reducer import GradientReducer
from ddtrain.engine.losses import LOSSES
from ddtrain.engine.model import build_model

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
LAYERS = [{"type": "flatten"}, {"type": "linear", "out": 512}, {"type": "relu"},
          {"type": "linear", "out": 512}, {"type": "relu"}, {"type": "linear", "out": 10}]
comms = {True: MPICommunicator(shared_memory=True), False: MPICommunicator(shared_memory=False)}
comm = comms[True]
model = build_model(LAYERS, (28, 28))
loss = LOSSES["cross_entropy"]()
rng = np.random.default_rng(comm.rank)
local = batch // comm.size
x = rng.standard_normal((local, 28, 28)).astype(np.float32)
y = rng.integers(0, 10, local)

settings = {f"overlap={o}, bucket={b} MB, shared_memory={s}": (o, b, s)
            for o, b, s in ((True, 1.0, False), (True, 4.0, False), (False, 1.0, False), (False, 1.0, True))}
reducers = {name: GradientReducer(comms[s], model.params, bucket_mb=b, overlap=o)
            for name, (o, b, s) in settings.items()}
times = {name: ([], []) for name in settings}
for step in range(steps):
    for name, reducer in reducers.items():
        comm.Barrier()
        model.params.zero_grad()
        loss.forward(model.forward(x, train=True), y)
        t0 = time.perf_counter()
        model.backward(loss.backward(1.0 / batch), on_grads_ready=reducer.grads_ready)
        waited = reducer.finish()
        times[name][0].append(time.perf_counter() - t0)
        times[name][1].append(waited)
for name, (total, waited) in times.items():
    worst = [max(v) for v in zip(*comm.allgather_obj(total[5:]))]
    worst_wait = [max(v) for v in zip(*comm.allgather_obj(waited[5:]))]
    if comm.rank == 0:
        print(f"{name:45s} backward+reduce {1e3 * statistics.median(worst):7.2f} ms, "
              f"exposed wait {1e3 * statistics.median(worst_wait):6.2f} ms")
