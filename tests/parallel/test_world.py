"""world(): SingleProcess outside a launcher (and no mpi4py import), the guard's messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ddtrain.parallel import UNKNOWN_SIZE, abort_on_exception, exit_code_of, failure_message, launched_size
from ddtrain.parallel.comm import SingleProcess
from ddtrain.errors import ConfigError, DataError

LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, **extra}


def test_launched_size():
    assert launched_size({}) is None
    assert launched_size({"PMI_SIZE": "4", "PMI_RANK": "1"}) == 4  # MPICH hydra
    assert launched_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2  # Open MPI
    assert launched_size({"PMIX_RANK": "0"}) == UNKNOWN_SIZE
    with pytest.raises(ConfigError, match="PMI_SIZE"):
        launched_size({"PMI_SIZE": "x"})


def test_world_outside_mpi_is_single_process_and_never_imports_mpi4py():
    code = ("import sys; from ddtrain.parallel import world; c = world(timeout=5); "
            "print(type(c).__name__, c.rank, c.size, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["SingleProcess", "0", "1", "False"]


def test_launched_without_mpi4py_says_what_to_install():
    code = ("import sys; sys.modules['mpi4py'] = None\n"  # as if it were not installed
            "from ddtrain.parallel import world\n"
            "try:\n    world()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(PMI_SIZE="2", PMI_RANK="0"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ConfigError") and "pip install 'ddtrain[mpi]'" in out.stdout


def test_failure_messages_and_exit_codes():
    assert failure_message(2, DataError("train-images is truncated")) == "rank 2: train-images is truncated"
    msg = failure_message(1, ValueError("bad shape"))
    assert msg.startswith("rank 1: ValueError: bad shape") and "--debug" in msg
    assert failure_message(0, SystemExit(3)) == "rank 0: exited with status 3"
    assert exit_code_of(ConfigError("x")) == 2
    assert exit_code_of(DataError("x")) == 1
    assert exit_code_of(KeyboardInterrupt()) == 130
    assert exit_code_of(SystemExit("message")) == 1
    assert exit_code_of(RuntimeError()) == 1


def test_guard_with_one_process_lets_the_exception_through():
    with pytest.raises(DataError, match="boom"):
        with abort_on_exception(SingleProcess()):
            raise DataError("boom")
    with abort_on_exception(SingleProcess()):
        pass
