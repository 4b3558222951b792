"""Every gradient-sync implementation under mpiexec -n K gives the global sum and the summed flags.

Each rank fills its gradient with its own integer values (so every float sum is exact and the
check is bitwise whatever order a path adds in), drives the sync the way the trainer does
(backward's on_grads_ready for each layer, last layer first, then synchronize, update, after
update) and checks: the part of the gradient this rank's optimizer sees equals one plain
MPI_Allreduce of the whole buffer; the StepFlags are the sums over ranks; batch statistics
are the global sums; the collectives counted are the ones the path is named after.
Rank 0 prints "sync ok N".
"""

import numpy as np

from ddtrain.engine.model import build_model
from ddtrain.parallel import abort_on_exception, world
from ddtrain.parallel import mpi as mpi_module
from ddtrain.parallel.mpi import MPI, MPICommunicator
from ddtrain.parallel.sync import (FixedPointAllreduce, MPIAllreduce, NodeSharedMemory, OneProcess, StepFlags,
                                   make_sync)
from ddtrain.engine.optim import make_optimizer
from ddtrain.parallel.threads import core_free_beside

comm = world()
if comm.size == 1:
    comm = MPICommunicator()
LAYERS = [{"type": "flatten"}, {"type": "linear", "out": 128}, {"type": "relu"}, {"type": "linear", "out": 32},
          {"type": "relu"}, {"type": "linear", "out": 10}]


def fresh_model():
    return build_model(LAYERS, (1, 28, 28), seed=0)


def first_offsets(model):
    return sorted(model._first_offset.values(), reverse=True)


def check(sync, model, values, exact_sum, name):
    model.params.grad[...] = values
    for offset in first_offsets(model):  # as Sequential.backward reports them
        if sync.on_grads_ready is not None:
            sync.on_grads_ready(offset)
    sync.part_done()
    flags = sync.synchronize(StepFlags(stop=comm.rank, nonfinite=0))
    part = sync.params
    assert flags == StepFlags(stop=comm.size * (comm.size - 1) // 2, nonfinite=0), (name, flags)
    assert np.array_equal(part.grad, exact_sum[part.start:part.start + part.size]), name
    sync.after_update()


def before_mpi4(make):
    """make, building its sync as over an MPI library without persistent collectives."""
    def build(model):
        real = mpi_module.persistent_collectives
        mpi_module.persistent_collectives = lambda: False
        try:
            return make(model)
        finally:
            mpi_module.persistent_collectives = real
    return build


with abort_on_exception(comm):
    rng = np.random.default_rng(comm.rank)
    syncs = {"blocking": lambda m: MPIAllreduce(comm, m),
             "overlap, 3 buckets": lambda m: MPIAllreduce(comm, m, overlap=True, bucket_mb=0.001),
             "overlap, 1 bucket": lambda m: MPIAllreduce(comm, m, overlap=True, bucket_mb=100.0),
             "blocking, MPI before 4": before_mpi4(lambda m: MPIAllreduce(comm, m)),
             "overlap, 3 buckets, MPI before 4": before_mpi4(
                 lambda m: MPIAllreduce(comm, m, overlap=True, bucket_mb=0.001))}
    if comm.size > 1:
        syncs["shared memory"] = lambda m: NodeSharedMemory(comm, m)
    for name, make in syncs.items():
        model = fresh_model()
        sync = make(model)
        for step in range(3):
            values = rng.integers(-50, 50, model.params.size).astype(np.float32)
            exact = values.copy()
            comm._comm.Allreduce(MPI.IN_PLACE, exact, op=MPI.SUM)
            check(sync, model, values, exact, name)
        counted = dict(sync.calls)
        if name.startswith("blocking"):
            assert counted == {"persistent Allreduce": 3}, counted
        elif name.startswith("overlap, 3 buckets"):
            assert counted == {"persistent Allreduce of a bucket": 3 * len(sync.buckets)} and len(sync.buckets) == 3, \
                counted
        elif name == "shared memory":
            assert counted == {"node_sync": 6} and "Allreduce" not in counted, counted

    # a non-finite gradient on one rank is agreed by every rank, on every path
    for name, make in syncs.items():
        model = fresh_model()
        sync = make(model)
        model.params.grad[...] = 1.0
        if comm.rank == comm.size - 1:
            model.params.grad[7] = np.inf
        for offset in first_offsets(model):
            if sync.on_grads_ready is not None:
                sync.on_grads_ready(offset)
        sync.part_done()
        assert sync.synchronize(StepFlags()).nonfinite == 1, name
        sync.after_update()

    # train.nonfinite=stop: the sync leaves the check to the update; after_update agrees on what
    # the updates found (the allreduce: every rank updates the same sum; shared memory: the
    # owner of the element's part finds it, the flags ride the node sync), so every rank stops
    stop_paths = ["blocking", "overlap, 3 buckets"] + (["shared memory"] if "shared memory" in syncs else [])
    for name in stop_paths:
        for bad_rank in (None, comm.size - 1):
            model = fresh_model()
            sync = syncs[name](model)
            sync.leave_check_to_optimizer()
            opt = make_optimizer("sgd", sync.params, momentum=0.9)
            model.params.grad[...] = 1.0
            if comm.rank == bad_rank:
                model.params.grad[7] = np.nan
            for offset in first_offsets(model):
                if sync.on_grads_ready is not None:
                    sync.on_grads_ready(offset)
            sync.part_done()
            assert sync.synchronize(StepFlags()).nonfinite == 0, name  # not checked before the sum
            found = opt.step(0.1, check=True)
            if name != "shared memory":
                assert found == (bad_rank is not None), (name, found)
            agreed = sync.after_update(found)
            assert (agreed > 0) == (bad_rank is not None), (name, bad_rank, agreed)

    # batch statistics: the sums over every rank, also from a rank with nothing to add
    model = fresh_model()
    sync = MPIAllreduce(comm, model)
    seen = []
    local = np.array([comm.rank, 1.0]) if comm.rank % 2 == 0 else np.zeros(2)
    total = sync.context(0, 0, 0, 8).batch_sum("0.fwd", local, on_global=seen.append)
    evens = [r for r in range(comm.size) if r % 2 == 0]
    assert list(total) == [sum(evens), len(evens)] and len(seen) == 1, total

    # the factory: what the job would run
    class Dist:
        deterministic, shared_memory, overlap, bucket_mb, micro_shards = False, "auto", False, 1.0, 8
    several = comm.size > 1
    assert isinstance(make_sync(Dist, comm, fresh_model()), NodeSharedMemory if several else OneProcess)
    Dist.shared_memory = False
    assert isinstance(make_sync(Dist, comm, fresh_model()), MPIAllreduce if several else OneProcess)
    if several:  # overlap where a core is free to progress the buckets, else blocking, said so
        Dist.overlap = True
        sync = make_sync(Dist, comm, fresh_model())
        free = core_free_beside(comm.local_size)
        assert sync.overlap == free and ("dist.overlap declined" in sync.label) != free, sync.label
        Dist.overlap = False
    Dist.deterministic = True
    assert isinstance(make_sync(Dist, comm, fresh_model()), FixedPointAllreduce)
if comm.rank == 0:
    print(f"sync ok {comm.size}", flush=True)
