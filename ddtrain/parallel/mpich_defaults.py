"""MPICH settings ddtrain starts with unless the user set them (applied before MPI_Init).

`DEFAULTS` maps MPICH control variables to values measured better for ddtrain's gradient
buffers than MPICH's own choice; `apply(environ)` sets each one that the environment does
not set already, so a user's export always wins.

Empty, as measured: `python -m ddtrain.benchmarks.mpich_algorithms` (MPICH 5.0.2, 2 ranks on
one node of the 2-core AMD EPYC VM, MPI_Allreduce IN_PLACE of the mlp's 2.68 MB float32 wire,
median of 200 calls per job, 5 and 7 rounds) found no MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM
(recursive_doubling, reduce_scatter_allgather, k_reduce_scatter_allgather, ring, recexch,
tree, nb), MPIR_CVAR_ALLREDUCE_POSIX_INTRA_ALGORITHM (release_gather, mpir),
MPIR_CVAR_DEVICE_COLLECTIVES=none or shared-memory cell size faster than the default in both
runs; recexch, tree, recursive_doubling and MPIR_CVAR_CH4_CMA_ENABLE=0 were slower in both
(1.4-6.5x). The machine was shared (spreads of +-70-200%), so a gain under ~20% would not show:
rerun the script on the target machine before adding an entry here.
Rerun on the 2-core Intel Xeon (3 rounds, spreads of 0-3%): the default took 462 us; none was
faster by more than 2% (reduce_scatter_allgather and k_reduce_scatter_allgather 0.986x and
0.983x, within the spread); ring 1.22x, recursive_doubling 1.14x, tree 1.86x, recexch 3.1x and
no CMA 1.47x slower (benchmarks/results/mpich-allreduce-algorithms-2core-xeon.txt).
"""

from __future__ import annotations

from collections.abc import MutableMapping

DEFAULTS: dict[str, str] = {}


def apply(environ: MutableMapping[str, str]) -> None:
    """Set every DEFAULTS entry the environment does not set yet (the user's value wins)."""
    for key, value in DEFAULTS.items():
        environ.setdefault(key, value)
