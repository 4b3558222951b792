"""BLAS/OpenMP threads per rank: cores // ranks on this node, decided before numpy loads.

N ranks on one node that each start a BLAS thread per core oversubscribe the cores N-fold
and every matrix product slows down (PyTorch's launcher sets OMP_NUM_THREADS for the same
reason). OpenBLAS, MKL and OpenMP read their variables once, when numpy is first imported,
so `configure_threads` must run before that (the CLI calls it first thing); if numpy is
already loaded it falls back to threadpoolctl when installed, and says so otherwise.

Precedence: ``--threads`` > DDTRAIN_THREADS > an OMP_NUM_THREADS the user exported >
max(1, cores // ranks on this node). Deterministic runs (``--deterministic``) use one thread
per rank whatever is asked: a matrix product's rounding can depend on how many threads split
it, and bitwise-identical weights for any rank count must not depend on cores / ranks. The ranks on this node come from the launcher:
hydra's MPI_LOCALNRANKS or Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE (1 outside a launcher).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

from ddtrain.errors import ConfigError

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")

log = logging.getLogger("ddtrain")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def core_free_beside(ranks_here: int, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this node has a core that none of its `ranks_here` ranks' threads (the count
    configure_threads set, OMP_NUM_THREADS) occupies: one that can progress MPI while they compute."""
    return usable_cores() > ranks_here * _positive(env.get("OMP_NUM_THREADS", "1"), "OMP_NUM_THREADS")


def ranks_on_node(env: Mapping[str, str] = os.environ) -> int:
    """How many ranks the launcher started on this node (1 when not under a launcher)."""
    for key in LOCAL_SIZE_VARS:
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _positive(value: str, source: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{source} must be a positive number of threads, not {value!r}")
    return n


DETERMINISTIC_REASON = "deterministic: a product's rounding can depend on the thread count"


def choose_threads(requested: int | None, env: Mapping[str, str], cores: int,
                   deterministic: bool = False) -> tuple[int, str]:
    """The thread count per rank and where it comes from (pure; see the module docstring)."""
    if deterministic:
        if requested not in (None, 1):
            raise ConfigError(f"--threads {requested} with --deterministic: deterministic runs use 1 BLAS "
                              f"thread per rank (a product's rounding can depend on the thread count); "
                              f"drop --threads")
        return 1, DETERMINISTIC_REASON
    if requested is not None:
        return _positive(str(requested), "--threads"), "--threads"
    if env.get("DDTRAIN_THREADS"):
        return _positive(env["DDTRAIN_THREADS"], "DDTRAIN_THREADS"), "DDTRAIN_THREADS"
    if env.get("OMP_NUM_THREADS"):
        return _positive(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    local = ranks_on_node(env)
    return max(1, cores // local), f"{cores} cores / {local} rank(s) on this node"


def configure_threads(requested: int | None = None,
                      env: MutableMapping[str, str] = os.environ, deterministic: bool = False) -> int:
    """Decide the BLAS/OpenMP threads of this rank, apply them, log and return the count.

    Sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS in `env` (effective when
    numpy has not been imported yet); with numpy already imported, applies the limit through
    threadpoolctl if it is installed, else logs a warning.
    Raises ConfigError for a count that is not a positive integer.
    """
    n, why = choose_threads(requested, env, usable_cores(), deterministic)
    for key in THREAD_VARS:
        env[key] = str(n)
    if "numpy" in sys.modules and env is os.environ:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            log.warning("numpy was imported before the thread count was set; BLAS may use more than "
                        "%d thread(s): pip install threadpoolctl, or set OMP_NUM_THREADS=%d", n, n)
        else:
            threadpool_limits(n)
    log.info("%d BLAS thread(s) per rank (%s)", n, why)
    return n
