"""GradientReducer under mpiexec -n K: overlap on and off equal a plain Allreduce.

Each rank fills the gradient with its own values; the reducer (driven like
Sequential.backward: grads_ready(first offset of each layer), last layer first) must give
what one Allreduce of the whole buffer gives. Integer-valued floats make every sum exact,
so the check is bitwise whatever order MPI adds in; random floats are checked to 1e-6.
Rank 0 prints "reducer ok N".
"""

import numpy as np

from ddtrain.parallel import abort_on_exception, world
from ddtrain.parallel.mpi import MPICommunicator
from ddtrain.parallel.reducer import GradientReducer
from ddtrain.engine.params import FlatParams

comm = world()
if comm.size == 1:
    comm = MPICommunicator()
# 434 KB: above the shared-memory threshold, so overlap=False takes that path
specs = [("0.weight", (128, 784)), ("0.bias", (128,)), ("2.weight", (32, 128)), ("2.bias", (32,)),
         ("4.weight", (10, 32)), ("4.bias", (10,))]
layer_offsets = [0, 128 * 784 + 128, 128 * 784 + 128 + 32 * 128 + 32]  # first index of each layer

with abort_on_exception(comm):
    params = FlatParams(specs)
    rng = np.random.default_rng(comm.rank)
    for exact in (True, False):
        for step in range(3):
            values = rng.integers(-50, 50, params.size) if exact else rng.standard_normal(params.size)
            expected = values.astype(np.float32)
            comm.Allreduce(expected)
            # 3, 2 and 1 buckets, then no overlap
            for overlap, bucket_mb in ((True, 0.001), (True, 0.01), (True, 100.0), (False, 1.0)):
                reducer = GradientReducer(comm, params, bucket_mb=bucket_mb, overlap=overlap)
                params.grad[...] = values
                for offset in reversed(layer_offsets):
                    reducer.grads_ready(offset)
                waited = reducer.finish()
                assert waited >= 0.0 and not reducer.pending
                if exact:
                    assert np.array_equal(params.grad, expected), (overlap, bucket_mb)
                else:
                    np.testing.assert_allclose(params.grad, expected, rtol=1e-6, atol=1e-6)
    # finish() without any grads_ready (a model that does not report): still every bucket
    reducer = GradientReducer(comm, params, bucket_mb=0.001)
    params.grad[...] = 1.0
    reducer.finish()
    assert (params.grad == comm.size).all()
    if comm.size > 1:  # a new step's grads_ready before finish() is a caller bug, said at once
        reducer.grads_ready(layer_offsets[-1])
        try:
            reducer.grads_ready(layer_offsets[-1] + 1)
        except RuntimeError as e:
            assert "call finish()" in str(e)
        else:
            raise AssertionError("grads_ready with a larger offset was accepted")
        reducer.finish()
if comm.rank == 0:
    print(f"reducer ok {comm.size}", flush=True)
