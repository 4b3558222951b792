"""Gradient-sync paths, one object each, chosen once by `make_sync` from the config and the world.

    OneProcess           one process: nothing to combine
    MPIAllreduce         MPI_Allreduce of [flags | gradient] (blocking, or buckets overlapped
                         with backward): between nodes, GPUs, the reference
    FixedPointAllreduce  fixed micro-shards in int64 fixed point: bitwise the same for any rank count
    NodeSharedMemory     one parameter copy per node in shared memory, each rank reduces and
                         updates its part (hierarchical across nodes)

The interface they share, and the step the trainer runs over it, is in base.py.
"""

from __future__ import annotations

from ddtrain.errors import ConfigError, everywhere
from ddtrain.parallel.sync.allreduce import MPIAllreduce
from ddtrain.parallel.sync.base import GradientSync, StepFlags
from ddtrain.parallel.sync.fixed_point import FixedPointAllreduce
from ddtrain.parallel.sync.shared_memory import NodeSharedMemory
from ddtrain.parallel.sync.single import OneProcess
from ddtrain.parallel.threads import core_free_beside

__all__ = ["make_sync", "shared_memory_refusal", "GradientSync", "StepFlags", "OneProcess", "MPIAllreduce",
           "FixedPointAllreduce", "NodeSharedMemory"]


def shared_memory_refusal(dist, comm, is_gpu: bool) -> str | None:
    """Why node shared memory cannot run in this job (None: it can). Every rank has the same
    config and node layout, so every rank gets the same answer."""
    if is_gpu:
        return "needs --device cpu: GPU memory is not the node's shared memory"
    if dist.deterministic:
        return ("and dist.deterministic exclude each other (the shared-memory sum is not bitwise "
                "reproducible across rank counts): choose one")
    if comm.ranks_per_node is None:
        return "needs as many ranks on every node"
    if comm.local_size == 1:
        return "needs several ranks on a node, but every node runs one"
    return None


def make_sync(dist, comm, model, is_gpu: bool = False, nonfinite: str = "stop") -> GradientSync:
    """The sync for this job: `dist` is the config's dist section, `comm` the world, `nonfinite`
    train.nonfinite.

    dist.deterministic -> FixedPointAllreduce (one process too: the same micro-shards, so that
    one process gives the bits N ranks give); one process -> OneProcess; node shared memory
    where it applies and dist.shared_memory is auto or true -> NodeSharedMemory (true refuses
    with a ConfigError naming what rules it out); else MPIAllreduce (dist.overlap, bucket_mb;
    overlap=true only where a core is free to progress the buckets, else blocking, said in its
    label; "always": buckets anyway).
    With nonfinite "stop", a sync whose update can check (`update_can_check`: all but the fixed
    point and shared memory across nodes) leaves the non-finite check to it (base.py).
    Collective: every rank calls it at the same point. Build the optimizer over `.params` after.
    """
    sync = _make(dist, comm, model, is_gpu)
    if nonfinite == "stop" and sync.update_can_check:
        sync.leave_check_to_optimizer()
    return sync


def _make(dist, comm, model, is_gpu: bool) -> GradientSync:
    if comm.size == 1 and not dist.deterministic:
        return OneProcess(comm, model)
    if dist.shared_memory is not False and comm.size > 1:
        reason = shared_memory_refusal(dist, comm, is_gpu)
        if reason is None:
            return NodeSharedMemory(comm, model)
        if dist.shared_memory is True:
            raise everywhere(ConfigError(f"dist.shared_memory {reason}; or leave it at auto (the "
                                         f"allreduce where shared memory cannot apply)"))
    if dist.deterministic:
        return FixedPointAllreduce(comm, model, dist.micro_shards)
    if dist.overlap is True and not core_free_beside(comm.local_size):
        # MPICH progresses a nonblocking collective only inside MPI calls unless a core is
        # free: buckets then cost 1.2-1.6x the one blocking call and overlap nothing (2 ranks on
        # the 2-core Xeon), so the node runs the blocking one and says why.
        sync = MPIAllreduce(comm, model, overlap=False)
        sync.label += (f" (dist.overlap declined: the {comm.local_size} rank(s) of this node and their threads "
                       f"occupy every core, none is free to progress overlapped buckets)")
        return sync
    return MPIAllreduce(comm, model, overlap=bool(dist.overlap), bucket_mb=dist.bucket_mb)
