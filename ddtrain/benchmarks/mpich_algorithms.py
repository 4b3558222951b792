"""MPICH's allreduce algorithms on ddtrain's gradient buffer, 2 ranks on one node.

usage: python -m ddtrain.benchmarks.mpich_algorithms [--rounds 3] [--repeats 200] [--floats 669722]

For each setting below (MPICH control variables put in the environment of `mpiexec -n 2`),
the ranks time `MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)` of a float32 buffer
the size of the mlp config's allreduce wire (669,722 floats, 2.68 MB), each call after a Barrier,
`--repeats` times after 10 warm-up calls; a call's time is the slowest rank's, a run's figure the
median; every call's result is checked. The settings run in a rotated order in each of
`--rounds` rounds (separate jobs), and the table gives the median over rounds with the spread
((max - min) / median) and the ratio to MPICH's own choice (no variable set) paired per round.
The last line is one JSON object with every figure. (`--worker` is what each job runs.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "default (MPICH's choice)": {},
    "intra: recursive_doubling": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "recursive_doubling"},
    "intra: reduce_scatter_allgather": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "reduce_scatter_allgather"},
    "intra: k_reduce_scatter_allgather": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "k_reduce_scatter_allgather"},
    "intra: ring": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"},
    "intra: recexch": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "recexch"},
    "intra: tree": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "tree"},
    "intra: nb": {"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "nb"},
    "posix: release_gather": {"MPIR_CVAR_DEVICE_COLLECTIVES": "all",
                              "MPIR_CVAR_ALLREDUCE_POSIX_INTRA_ALGORITHM": "release_gather"},
    "posix: mpir": {"MPIR_CVAR_ALLREDUCE_POSIX_INTRA_ALGORITHM": "mpir"},
    "device collectives: none": {"MPIR_CVAR_DEVICE_COLLECTIVES": "none"},
    "shm cells 16 KB": {"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE": "16384"},
    # cells above 16 KB need a pack buffer at least as large (MPICH asserts at start otherwise)
    "shm cells 64 KB": {"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE": "65536",
                        "MPIR_CVAR_CH4_PACK_BUFFER_SIZE": "131072"},
    "no CMA (copies through shm cells)": {"MPIR_CVAR_CH4_CMA_ENABLE": "0"},
}


def worker(repeats: int, floats: int) -> None:
    import numpy as np
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    size = world.Get_size()
    buf = np.empty(floats, np.float32)
    times = []
    for i in range(repeats + 10):
        buf.fill(1.0)
        world.Barrier()
        t0 = time.perf_counter()
        world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        dt = time.perf_counter() - t0
        if buf[0] != size or buf[-1] != size:
            raise SystemExit(f"wrong sum: {buf[0]}, {buf[-1]} (expected {size})")
        if i >= 10:
            times.append(dt)
    slowest = [max(v) for v in zip(*world.allgather(times))]
    if world.Get_rank() == 0:
        print(json.dumps({"median_us": 1e6 * statistics.median(slowest),
                          "p90_us": 1e6 * statistics.quantiles(slowest, n=10)[-1]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--floats", type=int, default=669_722)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.repeats, args.floats)
        return
    from ddtrain.launch import find_mpiexec

    mpiexec, _ = find_mpiexec()
    base = {k: v for k, v in os.environ.items() if not k.startswith("MPIR_CVAR_")}
    base.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    names = list(SETTINGS)
    runs: dict[str, list] = {n: [] for n in names}
    for rnd in range(args.rounds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            cmd = [mpiexec, "-n", "2", sys.executable, "-m", "ddtrain.benchmarks.mpich_algorithms", "--worker",
                   "--repeats", str(args.repeats), "--floats", str(args.floats)]
            proc = subprocess.run(cmd, env={**base, **SETTINGS[name]}, capture_output=True, text=True, timeout=600)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": " / ".join(proc.stderr.strip().splitlines()[:2])[:300]}
            runs[name].append(res)
            print(f"round {rnd + 1}/{args.rounds} {name}: {res.get('median_us', res.get('error'))}", file=sys.stderr,
                  flush=True)
    default = names[0]
    table = {}
    for name in names:
        meds = [r["median_us"] for r in runs[name] if "median_us" in r]
        pairs = [a["median_us"] / d["median_us"] for a, d in zip(runs[name], runs[default])
                 if "median_us" in a and "median_us" in d]
        if not meds:
            table[name] = {"error": runs[name][-1].get("error")}
            continue
        m = statistics.median(meds)
        table[name] = {"env": SETTINGS[name], "median_us": m, "spread": (max(meds) - min(meds)) / m,
                       "runs_us": meds, "vs_default": statistics.median(pairs) if pairs else None,
                       "p90_us": statistics.median([r["p90_us"] for r in runs[name] if "p90_us" in r])}
    width = max(map(len, names))
    print(f"MPI_Allreduce (IN_PLACE, SUM) of {args.floats:,} float32 ({4 * args.floats / 1e6:.2f} MB), 2 ranks, "
          f"median of {args.repeats} (slowest rank), median over {args.rounds} rounds")
    for name, t in table.items():
        if "error" in t:
            print(f"  {name:{width}s}  failed: {t['error']}")
        else:
            print(f"  {name:{width}s}  {t['median_us']:8.0f} us ±{50 * t['spread']:3.0f}%  p90 {t['p90_us']:8.0f} us  "
                  f"{t['vs_default']:.3f}x default")
    print(json.dumps({"floats": args.floats, "repeats": args.repeats, "rounds": args.rounds, "settings": table}))


if __name__ == "__main__":
    main()
