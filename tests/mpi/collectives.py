"""Communicator collectives at any world size (run by tests/parallel/test_mpi.py under mpiexec -n K).

Every rank checks the results itself and an assertion failure aborts the job (non-zero);
rank 0 prints "collectives ok N" at the end.
"""

import math

import numpy as np

from ddtrain.parallel import abort_on_exception, world
from ddtrain.parallel.mpi import MPI, MPICommunicator

comm = world()
if comm.size == 1:  # world() gives SingleProcess at size 1: test the MPI implementation anyway
    comm = MPICommunicator()
assert isinstance(comm, MPICommunicator)
rank, size = comm.rank, comm.size

with abort_on_exception(comm):
    # each rank sets grad = rank and scales by 1/size: the sum is the mean of the ranks
    grad = np.full(1000, rank / size, dtype=np.float32)
    comm.Allreduce(grad)
    np.testing.assert_allclose(grad, (size - 1) / 2, rtol=1e-6)

    # Allreduce is MPI_Allreduce, whatever the size: bit for bit what MPI's own call gives
    for dtype in (np.float32, np.float64):
        n = 100_003
        values = np.random.default_rng(rank).standard_normal(n).astype(dtype)
        expected = values.copy()
        comm._comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        big = values.copy()
        comm.Allreduce(big)
        assert np.array_equal(big, expected)

    ints = np.arange(10, dtype=np.int64) + rank
    comm.Allreduce(ints)
    assert (ints == size * np.arange(10) + size * (size - 1) // 2).all(), ints

    buf = np.full(7, rank, dtype=np.float64)
    req = comm.Iallreduce(buf)
    req.Wait()
    assert (buf == size * (size - 1) / 2).all(), buf

    # a persistent Allreduce sums what the buffer holds at each Start, on either MPI library
    import ddtrain.parallel.mpi as mpi_module
    for persistent in (True, False):
        real = mpi_module.persistent_collectives
        mpi_module.persistent_collectives = lambda: persistent  # False: as before MPI-4
        try:
            whole = np.empty(50_001, dtype=np.float32)
            req = comm.Allreduce_init(whole)
        finally:
            mpi_module.persistent_collectives = real
        assert req.Test()  # not started: nothing to wait for
        for step in range(3):
            whole[...] = rank + step
            req.Start()
            if step == 1:
                while not req.Test():
                    pass
            req.Wait()
            assert (whole == size * step + size * (size - 1) / 2).all(), (persistent, step, whole[:3])

    data = np.arange(5, dtype=np.float32) * 10 if rank == size - 1 else np.zeros(5, dtype=np.float32)
    comm.Bcast(data, root=size - 1)
    assert (data == np.arange(5) * 10).all(), data

    assert comm.bcast_obj({"r": rank} if rank == 0 else None) == {"r": 0}
    assert comm.allgather_obj(rank) == list(range(size))
    assert comm.allreduce_obj(rank) == size * (size - 1) // 2
    assert comm.allreduce_obj(rank, op="max") == size - 1
    assert comm.allreduce_obj((rank, -rank), op="min") == (0, -(size - 1))
    assert comm.allreduce_obj((1.5, rank), op="sum") == (1.5 * size, size * (size - 1) // 2)
    nan = comm.allreduce_obj(math.nan if rank == size - 1 else float(rank), op="max")
    assert math.isnan(nan), nan  # NaN wins wherever it is, on every rank

    assert 0 <= comm.local_rank < comm.local_size <= size
    assert sum(comm.allgather_obj(comm.local_size == size)) in (0, size)
    assert comm.ranks_per_node == comm.local_size  # one node here: every node runs local_size ranks
    comm.set_step(3)
    comm.Barrier()
if rank == 0:
    print(f"collectives ok {size}", flush=True)
