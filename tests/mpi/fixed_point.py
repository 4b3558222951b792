"""Fixed-point reduction under mpiexec -n K: bitwise the same sum for any K and any split.

usage: fixed_point.py SPLIT   (contiguous | strided)
The same 12 float32 "micro-shard gradients" (seeded, magnitudes spread over 1e-6..1e2) are
dealt to the ranks contiguously or strided in reverse order; each rank hands its shards to a
FixedPointAllreduce (as the trainer does: the gradient of each, then part_done) and synchronizes. Rank 0 prints the sha256 of the result
(the pytest compares them across K and splits) and checks it against the float64 sum.
"""

import hashlib
import sys

import numpy as np

from ddtrain.parallel import abort_on_exception, world
from ddtrain.parallel.mpi import MPICommunicator
from ddtrain.engine.model import build_model
from ddtrain.parallel.sync import FixedPointAllreduce, StepFlags

N_SHARDS, P = 12, 5000
split = sys.argv[1]
comm = world()
if comm.size == 1:
    comm = MPICommunicator()
rng = np.random.default_rng(1234)
shards = [(rng.standard_normal(P) * 10.0 ** rng.uniform(-6, 2, P)).astype(np.float32) for _ in range(N_SHARDS)]
if split == "contiguous":
    per = -(-N_SHARDS // comm.size)
    mine = list(range(comm.rank * per, min(N_SHARDS, (comm.rank + 1) * per)))
else:
    mine = list(range(comm.rank, N_SHARDS, comm.size))[::-1]

with abort_on_exception(comm):
    model = build_model([{"type": "linear", "out": 10}], (P // 10 - 1,))  # P parameters
    params = model.params
    assert params.size == P
    sync = FixedPointAllreduce(comm, model, N_SHARDS)
    for step in range(2):  # the second step reuses the buffers
        for i in mine:
            params.grad[...] = shards[i]
            sync.part_done()
        assert sync.synchronize(StepFlags()) == StepFlags()
    exact = np.sum(np.stack(shards).astype(np.float64), axis=0)
    np.testing.assert_allclose(params.grad, exact, rtol=1e-6, atol=1e-12)
    digest = hashlib.sha256(params.grad.tobytes()).hexdigest()
    assert comm.allgather_obj(digest) == [digest] * comm.size
    # a NaN on any rank is agreed by every rank
    params.grad[...] = shards[0]
    if comm.rank == comm.size - 1:
        params.grad[7] = np.nan
    sync.part_done()
    assert sync.synchronize(StepFlags()).nonfinite == 1
if comm.rank == 0:
    print(f"fixed_point {comm.size} {split} {digest}", flush=True)
