"""BLAS threads per rank: the choice (pure) and its effect on numpy's real OpenBLAS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ddtrain.parallel.threads import THREAD_VARS, choose_threads, configure_threads, ranks_on_node, usable_cores
from ddtrain.errors import ConfigError


def test_ranks_on_node_from_the_launchers():
    assert ranks_on_node({}) == 1
    assert ranks_on_node({"MPI_LOCALNRANKS": "4"}) == 4  # hydra
    assert ranks_on_node({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}) == 3  # Open MPI
    assert ranks_on_node({"MPI_LOCALNRANKS": "junk"}) == 1


def test_choose_threads_precedence():
    env = {"MPI_LOCALNRANKS": "4"}
    assert choose_threads(None, env, cores=16) == (4, "16 cores / 4 rank(s) on this node")
    assert choose_threads(None, {"MPI_LOCALNRANKS": "8"}, cores=2)[0] == 1  # never 0
    assert choose_threads(None, {**env, "OMP_NUM_THREADS": "3"}, 16)[0] == 3  # the user's export
    assert choose_threads(None, {**env, "OMP_NUM_THREADS": "3", "DDTRAIN_THREADS": "2"}, 16)[0] == 2
    assert choose_threads(5, {**env, "DDTRAIN_THREADS": "2"}, 16) == (5, "--threads")


@pytest.mark.parametrize("requested, env, says", [
    (0, {}, "--threads"), (None, {"DDTRAIN_THREADS": "two"}, "DDTRAIN_THREADS"),
    (None, {"OMP_NUM_THREADS": "-1"}, "OMP_NUM_THREADS"),
])
def test_bad_thread_counts_are_config_errors(requested, env, says):
    with pytest.raises(ConfigError, match=says):
        choose_threads(requested, env, cores=4)


def test_configure_threads_sets_every_library_variable():
    env = {"MPI_LOCALNRANKS": "1", "DDTRAIN_THREADS": "3"}
    assert configure_threads(None, env) == 3
    assert all(env[k] == "3" for k in THREAD_VARS)


_PROBE = """
import ctypes, glob, os, sys
from ddtrain.parallel.threads import configure_threads
n = configure_threads(None)
assert "numpy" not in sys.modules
import numpy
lib = glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "libscipy_openblas*"))
if not lib:
    print("no-openblas")
else:
    print(n, ctypes.CDLL(lib[0]).scipy_openblas_get_num_threads64_())
"""


def test_numpy_openblas_gets_cores_per_rank():
    """Set before numpy loads, the count reaches OpenBLAS: 2 ranks on this node share the cores."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and k != "DDTRAIN_THREADS"}
    env["MPI_LOCALNRANKS"] = "2"
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    if out.stdout.strip() == "no-openblas":
        pytest.skip("this numpy does not bundle scipy-openblas; nothing to probe")
    expected = max(1, usable_cores() // 2)
    assert out.stdout.split() == [str(expected), str(expected)]
