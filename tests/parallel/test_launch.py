"""ddtrain.launch without running a job: host lists, hostfiles, flavours, the command list."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys

import pytest

from ddtrain.errors import ConfigError
from ddtrain.launch import (build_launch_command, check_ranks, find_mpiexec, flavor_of, forwarded_env,
                            parse_hostfile, parse_hosts, read_hostfile, run_launch)
from tests.helpers import skip_or_fail

HYDRA_VERSION = "HYDRA build details:\n    Version:                                 5.0.2\n"
OPENMPI_VERSION = "mpiexec (Open MPI) 4.1.6\n\nReport bugs to http://www.open-mpi.org/community/help/\n"


def test_parse_hosts():
    assert parse_hosts("h1:2,h2:2") == [("h1", 2), ("h2", 2)]
    assert parse_hosts("node-1.cluster, 10.0.0.7:4") == [("node-1.cluster", 1), ("10.0.0.7", 4)]


@pytest.mark.parametrize("spec, says", [
    ("", "HOST[:SLOTS]"), ("h1,,h2", "HOST[:SLOTS]"), ("h1:0", "positive integer"),
    ("h1:x", "positive integer"), ("h 1:2", "not a host name"), ("h1:2,h1:2", "listed twice"),
])
def test_bad_host_lists_are_config_errors(spec, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_hosts(spec)


def test_parse_hostfile_both_syntaxes():
    hosts, syntaxes = parse_hostfile("# cluster\nnode1:4\nnode2   # one slot\n")
    assert hosts == [("node1", 4), ("node2", 1)] and syntaxes == {"mpich"}
    hosts, syntaxes = parse_hostfile("node1 slots=4 max_slots=8\nnode2\n")
    assert hosts == [("node1", 4), ("node2", 1)] and syntaxes == {"openmpi"}
    with pytest.raises(ConfigError, match="lists no hosts"):
        parse_hostfile("# nothing\n\n")
    with pytest.raises(ConfigError, match="line 2: cannot read 'cpus=3'"):
        parse_hostfile("node1\nnode2 cpus=3\n")


def test_read_hostfile_checks_the_syntax_against_the_launcher(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("node1 slots=2\nnode2 slots=2\n")
    assert read_hostfile(f, "openmpi") == [("node1", 2), ("node2", 2)]
    with pytest.raises(ConfigError, match="--hosts node1:2,node2:2"):
        read_hostfile(f, "mpich")
    with pytest.raises(ConfigError, match="--hostfile .*missing"):
        read_hostfile(tmp_path / "missing", "mpich")


def test_check_ranks():
    check_ranks(4, [("a", 2), ("b", 2)])
    check_ranks(16, None)  # local: oversubscribing is allowed
    with pytest.raises(ConfigError, match="-n 5 is more ranks than the 4 slot"):
        check_ranks(5, [("a", 2), ("b", 2)])
    with pytest.raises(ConfigError, match="at least 1"):
        check_ranks(0, None)


def test_flavor_of():
    assert flavor_of(HYDRA_VERSION) == "mpich"
    assert flavor_of("MPICH Version:      5.0.2\nMPICH Release date: ...") == "mpich"
    assert flavor_of("Intel(R) MPI Library for Linux* OS, Version 2021.10") == "mpich"
    assert flavor_of(OPENMPI_VERSION) == "openmpi"
    assert flavor_of("Open MPI v5.0.3, package: Open MPI ...") == "openmpi"
    assert flavor_of("something else") is None


def test_hydra_command():
    cmd = build_launch_command(4, [("h1", 2), ("h2", 2)], None, ["train", "--config", "mlp"], "mpich",
                               "/venv/bin/mpiexec", {"DDTRAIN_THREADS": "2"}, python="/venv/bin/python")
    assert cmd == ["/venv/bin/mpiexec", "-n", "4", "-hosts", "h1:2,h2:2", "-genv", "DDTRAIN_THREADS", "2",
                   "/venv/bin/python", "-m", "ddtrain", "train", "--config", "mlp"]
    cmd = build_launch_command(2, None, "hosts.txt", ["train"], "mpich", python="py")
    assert cmd == ["mpiexec", "-n", "2", "-f", "hosts.txt", "py", "-m", "ddtrain", "train"]


def test_openmpi_command():
    cmd = build_launch_command(4, [("h1", 2), ("h2", 2)], None, ["train"], "openmpi",
                               env={"DDTRAIN_DATA": "/data dir"}, python="py")
    assert cmd == ["mpiexec", "-np", "4", "--host", "h1:2,h2:2", "-x", "DDTRAIN_DATA=/data dir",
                   "py", "-m", "ddtrain", "train"]
    local = build_launch_command(8, None, None, ["train"], "openmpi", python="py")
    assert local == ["mpiexec", "-np", "8", "--oversubscribe", "py", "-m", "ddtrain", "train"]
    assert build_launch_command(2, None, "hf", ["train"], "openmpi", python="py")[3:5] == ["--hostfile", "hf"]


def test_arguments_stay_single_arguments():
    # A value with spaces or quotes is one argv element, never re-split by a shell.
    cmd = build_launch_command(2, None, None, ["train", "--set", "train.name=a b'c"], "mpich", python="py")
    assert cmd[-1] == "train.name=a b'c"
    assert shlex.split(shlex.join(cmd)) == cmd


def test_command_errors():
    with pytest.raises(ConfigError, match="nothing to launch"):
        build_launch_command(2, None, None, [], "mpich")
    with pytest.raises(ConfigError, match="cannot be 'launch'"):
        build_launch_command(2, None, None, ["launch", "-n", "2"], "mpich")
    with pytest.raises(ConfigError, match="not both"):
        build_launch_command(2, [("a", 1)], "hf", ["train"], "mpich")


def test_forwarded_env():
    env = forwarded_env({"DDTRAIN_DATA": "/d", "HOME": "/root", "DDTRAIN_DEBUG": "1"}, threads=3)
    assert env == {"DDTRAIN_DATA": "/d", "DDTRAIN_DEBUG": "1", "DDTRAIN_THREADS": "3"}
    assert forwarded_env({"PATH": "/bin"}) == {}
    # the kernels the launching shell chose (they decide how products round), not BLAS threads
    assert forwarded_env({"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512",
                          "OPENBLAS_NUM_THREADS": "4"}) == {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512"}
    with pytest.raises(ConfigError, match="--threads"):
        forwarded_env({}, threads=0)


def _fake_mpiexec(tmp_path, version_text: str):
    exe = tmp_path / "mpiexec"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_text}EOF\n")
    exe.chmod(0o755)
    return str(exe)


def test_find_mpiexec_matches_the_flavor(tmp_path):
    exe = _fake_mpiexec(tmp_path, OPENMPI_VERSION)
    assert find_mpiexec(exe, wanted="openmpi") == (exe, "openmpi")
    with pytest.raises(ConfigError, match="mpi4py uses mpich but the mpiexec found is not mpich's"):
        find_mpiexec(exe, wanted="mpich")
    with pytest.raises(ConfigError, match="not an executable"):
        find_mpiexec(str(tmp_path / "nope"), wanted="mpich")


def test_run_launch_dry_run_prints_the_exact_command(tmp_path, monkeypatch):
    if importlib.util.find_spec("mpi4py") is None:  # the flavour check asks mpi4py its MPI
        skip_or_fail("mpi4py is not installed (pip install 'ddtrain[mpi]')")
    for key in forwarded_env(os.environ):  # each would add a -genv pair to the command
        monkeypatch.delenv(key)
    monkeypatch.setenv("DDTRAIN_DATA", "/data/fashion mnist")
    printed = []
    exe = _fake_mpiexec(tmp_path, HYDRA_VERSION)
    rc = run_launch(3, ["train", "--epochs", "1"], hosts="a:2,b:1", threads=1, dry_run=True,
                    mpiexec=exe, echo=printed.append)
    assert rc == 0
    assert shlex.split(printed[0]) == [
        exe, "-n", "3", "-hosts", "a:2,b:1", "-genv", "DDTRAIN_DATA", "/data/fashion mnist",
        "-genv", "DDTRAIN_THREADS", "1", sys.executable, "-m", "ddtrain", "train", "--epochs", "1"]
    with pytest.raises(ConfigError, match="more ranks than"):
        run_launch(4, ["train"], hosts="a:2,b:1", dry_run=True, mpiexec=exe, echo=printed.append)
    assert len(printed) == 1  # nothing printed (nor started) for a bad request
