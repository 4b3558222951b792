"""ddtrain's gradient sync against a bare mpi4py Allreduce of the same bytes, and a memcpy.

usage: mpiexec -n 2 python -m ddtrain.benchmarks.allreduce [--repeats 200] [--config mlp]

The buffer is the config's flat gradient (mlp: 669,706 float32, 2.68 MB) as the allreduce sync
sends it (with its two-float header of step flags). The methods run interleaved, each after a
Barrier, so each sees the caches the others leave (as in training), in an order drawn anew every
repeat: a call right after one on another buffer measured up to 25% slower than the same call
after one on its own buffer (481 against 595 us: 2 ranks on the 2-core EPYC), so a fixed order
biases every comparison. A call's time is the slowest rank's. "alone_median_us" has each sync
against the bare calls on its own buffer, in runs of 10 calls of one method (after 2 untimed)
that touch only that buffer, the methods' runs alternated in a drawn order:
  blocking: ddtrain / bare Allreduce / bare persistent   (ddtrain_blocking's wire)
  overlap: ddtrain / bare Allreduce                       (ddtrain_overlap's wire)
These are the ratios the goals read: "ddtrain's allreduce against a bare Allreduce of the same
buffer", and overlapped against blocking as (overlap / its bare) / (blocking / its bare). Rank 0 prints one JSON line: the median microseconds of
  memcpy            np.copyto of the buffer into another (the physical unit of the reduction)
  bare_allreduce    MPI.COMM_WORLD.Allreduce(IN_PLACE, buf, SUM): what mpi4py gives anyone
  bare_iallreduce   Iallreduce + Wait of the whole buffer
  bare_persistent   Start + Wait of a persistent Allreduce_init of the whole buffer (MPI-4), made
                    once: what ddtrain's allreduce path runs
  wire_persistent   the same call on ddtrain_blocking's own wire buffer (what MPI alone takes on
                    that buffer: ddtrain_blocking minus this is ddtrain's code)
  ddtrain_blocking  MPIAllreduce as the allreduce path trains by default (dist.overlap=false,
                    train.nonfinite=stop): backward's reports (nothing to do: the update checks
                    the summed gradient, see ddtrain.parallel.sync.base), then synchronize()
                    (one MPI_Allreduce of the gradient with the step flags in its header)
  ddtrain_checked   the same with train.nonfinite=skip: on_grads_ready(offset) for each layer,
                    last first (each layer's non-finite check, which training runs inside
                    backward), then synchronize()
  ddtrain_sync      synchronize() alone of ddtrain_checked, the layers reported before the clock
                    starts (the bare calls too start with their buffer just read, as the reports
                    leave the gradient)
  nonfinite_check   the layers' reports alone (the checks ddtrain_checked adds to ddtrain_sync)
  ddtrain_overlap   MPIAllreduce with dist.overlap=true (nonfinite=stop): on_grads_ready(offset)
                    for each layer, last first (bucketed Iallreduce), then synchronize()
  shared_memory     NodeSharedMemory.synchronize() + after_update() (the default on one node:
                    each rank sums its part of the node's gradient slots), when every rank is on
                    one node
The communicator is MPICommunicator as training builds it (watchdog thread included), and
ddtrain.parallel.mpi is imported before MPI starts, as in training, so MPICH runs with
ddtrain's defaults (ddtrain.parallel.mpich_defaults; the environment's own settings win) for
the bare calls too: the JSON's "mpich" lists the MPIR_CVAR_ variables in effect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import os

import numpy as np


ALONE_RUN = 10  # calls of one method in a row in the "alone" measurement


def shuffled(names: list, i: int) -> list:
    """names in repeat i's order: a permutation every rank draws alike (seeded by i), so that
    each method follows every other about as often (a rotation would keep each one's predecessor)."""
    return [names[j] for j in np.random.default_rng(i).permutation(len(names))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--config", default="mlp")
    args = p.parse_args()

    from ddtrain.config import load_config
    from ddtrain.data.registry import input_shape
    from ddtrain.engine.model import build_model
    from ddtrain.parallel.mpi import MPICommunicator  # before mpi4py.MPI: MPICH's defaults apply
    from ddtrain.parallel.sync import MPIAllreduce, NodeSharedMemory, StepFlags
    from ddtrain.parallel.sync.allreduce import HEADER
    from mpi4py import MPI

    cfg = load_config(args.config)
    comm = MPICommunicator()
    world = MPI.COMM_WORLD

    def model():
        return build_model(cfg.model.layers, input_shape(cfg.data.dataset), seed=0)

    blocking = MPIAllreduce(comm, model(), overlap=False)
    overlap_model = model()
    overlap = MPIAllreduce(comm, overlap_model, overlap=True, bucket_mb=cfg.dist.bucket_mb)
    for sync in (blocking, overlap):  # as make_sync builds them with train.nonfinite=stop
        sync.leave_check_to_optimizer()
    checked = MPIAllreduce(comm, model(), overlap=False)  # train.nonfinite=skip
    firsts: dict[str, int] = {}  # layer index -> its first flat index, as Sequential.backward reports
    for slot in overlap_model.params.slots:
        firsts.setdefault(slot.name.split(".")[0], slot.start)
    layer_starts = sorted(firsts.values(), reverse=True)
    wire = blocking.wire
    bare = np.zeros_like(wire)
    persistent = world.Allreduce_init(MPI.IN_PLACE, bare, op=MPI.SUM)

    on_wire = world.Allreduce_init(MPI.IN_PLACE, wire, op=MPI.SUM)

    def wire_persistent():
        on_wire.Start()
        on_wire.Wait()

    def bare_persistent():
        persistent.Start()
        persistent.Wait()
    src, dst = np.ones_like(wire), np.empty_like(wire)
    flags = StepFlags()

    def reported(sync):  # what Sequential.backward does as each layer's gradient is final
        def report():
            if sync.on_grads_ready is not None:
                for offset in layer_starts:
                    sync.on_grads_ready(offset)
        return report

    def blocking_step():
        reported(blocking)()
        blocking.synchronize(flags)

    def overlapped():
        reported(overlap)()
        overlap.synchronize(flags)

    def checked_step():
        reported(checked)()
        checked.synchronize(flags)

    methods = {
        "memcpy": lambda: np.copyto(dst, src),
        "bare_allreduce": lambda: world.Allreduce(MPI.IN_PLACE, bare, op=MPI.SUM),
        "bare_iallreduce": lambda: world.Iallreduce(MPI.IN_PLACE, bare, op=MPI.SUM).Wait(),
        "bare_persistent": bare_persistent,
        "wire_persistent": wire_persistent,
        "ddtrain_blocking": blocking_step,
        "ddtrain_checked": checked_step,
        "ddtrain_sync": lambda: checked.synchronize(flags),
        "nonfinite_check": reported(checked),
        "ddtrain_overlap": overlapped,
    }
    # Run untimed before a method: its step's earlier part (the layers' reports before
    # ddtrain_sync), or its later one (the sync that closes the reports' step).
    # The bare calls get their buffer read into cache first as ddtrain_sync does (its reports
    # read the gradient), so neither side is timed from a colder cache than the other.
    def read(buf):
        return lambda: float(np.dot(buf, buf))
    # (the syncs that check nothing before the sum get their gradient read too, as backward
    # leaves it just written)
    before = {"ddtrain_sync": reported(checked), "bare_allreduce": read(bare), "bare_iallreduce": read(bare),
              "bare_persistent": read(bare), "wire_persistent": read(wire),
              "ddtrain_blocking": read(blocking.wire), "ddtrain_overlap": read(overlap.wire)}
    after = {"nonfinite_check": lambda: checked.synchronize(flags)}
    grads = [bare, blocking.params.grad, overlap.params.grad, checked.params.grad]
    if comm.local_size == comm.size:
        shared = NodeSharedMemory(comm, model())

        def shared_step():
            shared.synchronize(flags)
            shared.after_update()
        methods["shared_memory"] = shared_step
        grads.append(shared.full.grad)

    times = {name: [] for name in methods}
    names = list(methods)
    for i in range(args.repeats + 5):
        for name in shuffled(names, i):
            fn = methods[name]
            for g in grads:  # stays finite and small however often it is summed
                g.fill(1.0 / comm.size)
            if name in before:
                before[name]()
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if name in after:
                after[name]()
            if i >= 5:  # the first calls build windows and buckets
                times[name].append(t1 - t0)
    # Alone: each sync against the bare calls on its own buffer, in runs of ALONE_RUN calls of one
    # method that touch nothing but that buffer (its refill and read, as backward leaves it): in
    # the loop above, a call after one on another buffer took up to 25% longer (module docstring).
    groups = {"blocking": (blocking.wire, {"ddtrain": blocking_step, "bare Allreduce": lambda: world.Allreduce(
                  MPI.IN_PLACE, blocking.wire, op=MPI.SUM), "bare persistent": wire_persistent}),
              "overlap": (overlap.wire, {"ddtrain": overlapped, "bare Allreduce": lambda: world.Allreduce(
                  MPI.IN_PLACE, overlap.wire, op=MPI.SUM)})}
    alone_times = {f"{g}: {m}": [] for g, (_, fns) in groups.items() for m in fns}
    for group, (buf, fns) in groups.items():
        for i in range(max(1, args.repeats // ALONE_RUN)):
            for name in shuffled(list(fns), i):
                for j in range(ALONE_RUN + 2):  # a run of the same call, as training repeats it
                    buf[HEADER:].fill(1.0 / comm.size)
                    read(buf)()
                    world.Barrier()
                    t0 = time.perf_counter()
                    fns[name]()
                    t1 = time.perf_counter()
                    if j >= 2:  # the first after another method's run
                        alone_times[f"{group}: {name}"].append(t1 - t0)
    persistent.Free()
    on_wire.Free()
    slowest = {name: [max(v) for v in zip(*world.allgather(t))] for name, t in times.items()}
    alone_slowest = {name: [max(v) for v in zip(*world.allgather(t))] for name, t in alone_times.items()}
    if comm.rank == 0:
        med = {name: 1e6 * statistics.median(v) for name, v in slowest.items()}
        print(json.dumps({"ranks": comm.size, "floats": int(wire.size), "bytes": int(wire.nbytes),
                          "repeats": args.repeats, "median_us": med,
                          "alone_median_us": {n: 1e6 * statistics.median(v) for n, v in alone_slowest.items()},
                          "p90_us": {n: 1e6 * statistics.quantiles(v, n=10)[-1] for n, v in slowest.items()},
                          "bucket_mb": cfg.dist.bucket_mb, "buckets": len(overlap.buckets),
                          "mpich": {k: v for k, v in os.environ.items() if k.startswith("MPIR_CVAR_")}}),
              flush=True)


if __name__ == "__main__":
    main()
