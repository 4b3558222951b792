"""Where one ddtrain training step spends its time: matrix products, element-wise work, the
optimizer, the data, communication, and Python glue.

usage: python -m ddtrain.benchmarks.profile_step --batch 64 [--samples 12800] [--threads 1]
       mpiexec -n 2 python -m ddtrain.benchmarks.profile_step --batch 128 ...   (global batch; one node:
       the shared-memory step, add --set dist.shared_memory=false for the MPI allreduce)

It runs the real `Trainer.fit()` of the mlp config (evaluation and checkpoints switched off)
with three kinds of probes, all outside ddtrain's code:
  * the backend's array module is a proxy that times every ``xp.<function>`` call: matmul
    is "matmul", every other call is "element-wise" (ufuncs, reductions, take, and the
    trainer's finite check ``xp.dot(g, g)``); so are the layers' loops of ddtrain.engine.kernels
    (ReLU, bias, pooling, BatchNorm: numba's or array ops), timed whole;
  * the trainer's `_batch` ("data"), the optimizer's `step` ("optimizer") and the gradient
    sync's `on_grads_ready`, `part_done`, `synchronize` and `after_update` plus the
    communicator's Allreduce ("communication": with the shared-memory sync, its sum over the
    node's slots and its node syncs, waits included) are wrapped; xp calls inside them count
    for them, not for matmul/element-wise (the sync's non-finite check is communication);
  * "python" is what is left of the wall time: interpreter work, array methods called on
    arrays (``a.sum()``, fancy indexing), minus the proxy's own measured cost per call.
Steady state only: the window runs from the start of the second step to the start of the
last. Finally `tracemalloc` (which numpy reports its buffers to) measures the bytes of
temporaries allocated during two steady-state steps.
Rank 0 prints one JSON line with milliseconds per step, and "by_call": the milliseconds per
step of each xp function (matmul includes Linear's bias-gradient gemv, ones @ dy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import tracemalloc
import types

MATMUL = {"matmul"}  # (dot is the trainer's finite check: element-wise work)
LAYER_LOOPS = ("relu", "relu_backward", "add_bias", "max_pool", "max_unpool", "scale_shift", "scale_shift_sum")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, required=True, help="global batch size")
    p.add_argument("--samples", type=int, default=None, help="training samples (one epoch) [200 steps]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", default="mlp")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    from ddtrain.parallel.threads import configure_threads
    configure_threads(args.threads)  # before numpy loads
    import numpy as np

    from ddtrain.backend import Backend
    from ddtrain.config import load_config
    from ddtrain.parallel import world
    from ddtrain.train.trainer import Trainer

    state = {"on": False, "cat": None}
    ms = dict.fromkeys(("matmul", "element-wise", "data", "optimizer", "communication"), 0.0)
    by_call: dict[str, float] = {}
    calls = [0]

    class TimedNumpy(types.ModuleType):
        """numpy, with every function call timed into `ms` (attributes are cached wrappers)."""

        def __getattr__(self, name):
            f = getattr(np, name)
            if not callable(f) or isinstance(f, type):
                return f
            kind = "matmul" if name in MATMUL else "element-wise"

            def timed(*a, **k):
                if not state["on"] or state["cat"] is not None:
                    return f(*a, **k)
                t = time.perf_counter()
                r = f(*a, **k)
                dt = time.perf_counter() - t
                ms[kind] += dt
                by_call[name] = by_call.get(name, 0.0) + dt
                calls[0] += 1
                return r
            setattr(self, name, timed)
            return timed

    def category(cat, fn):
        def timed(*a, **k):
            if not state["on"] or state["cat"] is not None:
                return fn(*a, **k)
            state["cat"] = cat
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                ms[cat] += time.perf_counter() - t
                state["cat"] = None
        return timed

    B = args.batch
    comm = world()
    samples = args.samples or 200 * B
    overrides = {"train.batch_size": B, "train.epochs": 1, "data.train_samples": samples}
    cfg = load_config(args.config, overrides, args.sets)
    backend = Backend("cpu", TimedNumpy("numpy"))
    run_dir = tempfile.mkdtemp(prefix="ddtrain-profile-") if comm.rank == 0 else tempfile.gettempdir()
    trainer = Trainer(cfg, comm, backend, run_dir, data_dir=args.data_dir, log=lambda m: None)
    trainer.evaluate = lambda: (0.0, 0.0)
    trainer.save = lambda: None
    trainer.agree()
    trainer.optimizer.step = category("optimizer", trainer.optimizer.step)
    sync = trainer.sync
    for name in ("on_grads_ready", "part_done", "synchronize", "after_update"):
        if getattr(sync, name, None) is not None:
            setattr(sync, name, category("communication", getattr(sync, name)))
    trainer._batch = category("data", trainer._batch)
    from ddtrain.engine.kernels import for_array_module
    loops = for_array_module(backend.xp)  # the instance every layer calls (one per process)
    for name in LAYER_LOOPS:
        setattr(loops, name, category("element-wise", getattr(loops, name)))
    comm.Allreduce = category("communication", comm.Allreduce)

    last = trainer.steps_per_epoch - 1
    window = {}
    train_step = trainer.train_step

    def probed_step(perm):
        k = trainer.cursor.step
        now = time.perf_counter()
        if k == 1:
            for key in ms:
                ms[key] = 0.0
            by_call.clear()
            calls[0] = 0
            state["on"] = True
            window["start"] = now
        elif k == last - 2:
            state["on"] = False
            window["stop"] = now
            tracemalloc.start()
        elif k == last:
            window["temporaries"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return train_step(perm)

    trainer.train_step = probed_step
    try:
        trainer.fit()
    finally:
        if comm.rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
    steps = last - 3
    wall = window["stop"] - window["start"]
    overhead = proxy_overhead(np)
    result = {k: 1e3 * v / steps for k, v in ms.items()}
    result["python"] = 1e3 * (wall - sum(ms.values()) - calls[0] * overhead) / steps
    if comm.rank == 0:
        print(json.dumps({"batch": B, "ranks": comm.size, "gradient_sync": trainer.gradient_sync, "per_rank_batch": B // comm.size, "steps": steps,
                          "step_ms": 1e3 * wall / steps, "ms": result,
                          "xp_calls_per_step": calls[0] / steps,
                          "proxy_overhead_us_per_call": 1e6 * overhead,
                          "temporaries_kb_per_2_steps": window.get("temporaries", 0) / 1024,
                          "samples_per_second": B * steps / wall,
                          "by_call": {k: 1e3 * v / steps for k, v in sorted(by_call.items(), key=lambda kv: -kv[1])}}),
              flush=True)


def proxy_overhead(np, n: int = 20000) -> float:
    """Seconds the timing wrapper adds to one call (a wrapped vs a direct tiny ufunc call)."""
    a = np.zeros(1, np.float32)
    f = np.add
    acc = [0.0]

    def timed(*x, **k):
        t = time.perf_counter()
        r = f(*x, **k)
        acc[0] += time.perf_counter() - t
        return r

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f(a, a, out=a)
        direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            timed(a, a, out=a)
        best = min(best, (time.perf_counter() - t0 - direct) / n)
    return max(best, 0.0)


if __name__ == "__main__":
    main()
